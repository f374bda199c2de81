"""KServe v2 / Triton HTTP endpoints: health, server and model metadata, model config, readiness, infer.

Inputs: `images` FP32 [N, C, H, W] (normalised as the manifest says) or `image_bytes` BYTES [N] (encoded images;
base64 strings when sent as JSON). Outputs: `logits` FP32 [N, classes], `class_id` INT64 [N], `exit_stage` INT32
[N], `flops` INT64 [N]. Request parameters `threshold`, `max_stage` and `operating_point` act as the v1 query
parameters do.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

import reskd
from reskd.validation import describe

from . import kserve
from .decoding import decode_batch
from .errors import bad_request, invalid, too_large
from .models import ServedModel
from .pipeline import admit, run_cascade, until_disconnected
from .scheduler import Admission
from .schemas import ERROR_RESPONSES
from .state import ServerState, get_state

router = APIRouter(tags=["kserve v2"], responses=ERROR_RESPONSES)

OUTPUTS = {"logits": "FP32", "class_id": "INT64", "exit_stage": "INT32", "flops": "INT64"}
INPUTS = {"images": "FP32", "image_bytes": "BYTES"}


@router.get("/v2/health/live", summary="Liveness: 200 while the process serves (503 if model loading failed)")
async def live(state: ServerState = Depends(get_state)):
    if state.failed:
        return JSONResponse({"error": "loading the models failed (see the server log); the server is stopping"},
                            status_code=503)
    return {"live": True}


@router.get("/v2/health/ready",
            summary="Readiness: 200 once every model is loaded and warmed up; 503 again once shutting down")
async def ready(state: ServerState = Depends(get_state)):
    state.require_ready(readiness=True)
    return {"ready": True}


@router.get("/v2", summary="Server metadata")
async def server_metadata():
    return {"name": "reskd", "version": reskd.__version__,
            "extensions": ["binary_tensor_data", "model_configuration", "reskd_early_exit"]}


def _metadata(model: ServedModel, versions: list[int]) -> dict:
    m = model.manifest
    c, h, w = model.runtime.input_shape
    cum = model.runtime.cum_flops.tolist()
    return {
        "name": model.name, "versions": [str(v) for v in versions], "platform": "reskd_cascade",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w]},
                   {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(m.labels)]},
                    {"name": "class_id", "datatype": "INT64", "shape": [-1]},
                    {"name": "exit_stage", "datatype": "INT32", "shape": [-1]},
                    {"name": "flops", "datatype": "INT64", "shape": [-1]}],
        # reskd's additions: what a client needs to reason about early exit and compute.
        "version": str(model.version),
        "labels": m.labels,
        "input": m.input.model_dump(),
        "stages": [{"stage": i, "name": s.name, "flops": s.flops, "cumulative_flops": cum[i],
                    "threshold": m.exit.thresholds[i] if i < len(m.exit.thresholds) else None,
                    # what the stage reads (the images, or an earlier stage's output the server carries for the
                    # samples that reach it) and the outputs it gives besides logits
                    "inputs": [{"name": x.name, "source": x.source} for x in s.inputs],
                    "outputs": [{"name": "logits", "shape": [len(m.labels)]},
                                *({"name": o.name, "shape": o.shape} for o in s.outputs)],
                    # how its logits make the running logits: added ("sum") or in their place ("replace")
                    "combine": kind}
                   for i, (s, kind) in enumerate(zip(m.stages, m.stage_combine))],
        "combine": m.combine,
        "exit_measure": m.exit.measure,
        "teacher_flops": m.teacher.flops,
        "teacher_model": m.teacher.model,
        "metrics": m.metrics.model_dump() if m.metrics else {},
        "operating_points": m.operating_points.model_dump() if m.operating_points else None,
    }


@router.get("/v2/models/{name}", summary="Model metadata: versions, tensors, stages, thresholds, FLOPs")
async def model_metadata(request: Request, name: str, state: ServerState = Depends(get_state)):
    model = state.model(request, name)
    return _metadata(model, state.store.versions(name))


@router.get("/v2/models/{name}/versions/{version}", summary="Metadata of one model version")
async def model_version_metadata(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    model = state.model(request, name, version)
    return _metadata(model, state.store.versions(name))


def _config(model: ServedModel, state: ServerState) -> dict:
    """Triton's model configuration (JSON form), describing what this server really does."""
    c, h, w = model.runtime.input_shape
    s = state.settings
    return {
        "name": model.name, "platform": "reskd_cascade", "backend": "onnxruntime",
        "version_policy": {"all": {}},
        "max_batch_size": s.max_images,
        "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": [c, h, w]},
                  {"name": "image_bytes", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [len(model.manifest.labels)]},
                   {"name": "class_id", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
                   {"name": "exit_stage", "data_type": "TYPE_INT32", "dims": [1], "reshape": {"shape": []}},
                   {"name": "flops", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
                             "preferred_batch_size": [s.max_batch_size],
                             "default_queue_policy": {"max_queue_size": s.max_queue_images}},
        "instance_group": [{"kind": "KIND_GPU" if model.device == "cuda" else "KIND_CPU", "count": 1}],
        "parameters": {"stages": {"string_value": str(model.runtime.num_stages)},
                       "scheduler": {"string_value": model.scheduler.policy},
                       "combine": {"string_value": model.manifest.combine},
                       "stage_combine": {"string_value": ",".join(model.manifest.stage_combine)},
                       "exit_measure": {"string_value": model.manifest.exit.measure},
                       **_points_parameters(model.manifest)},
    }


def _points_parameters(manifest) -> dict:
    """The operating points as Triton config parameters (string values): the default point's id and the whole
    curve as JSON. None for a version without them."""
    points = manifest.operating_points
    if points is None:
        return {}
    return {"default_operating_point": {"string_value": points.default},
            "operating_points": {"string_value": points.model_dump_json()}}


@router.get("/v2/models/{name}/config", summary="Model configuration (Triton's JSON form)")
async def model_config(request: Request, name: str, state: ServerState = Depends(get_state)):
    return _config(state.model(request, name), state)


@router.get("/v2/models/{name}/versions/{version}/config", summary="Configuration of one model version")
async def model_version_config(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    return _config(state.model(request, name, version), state)


@router.get("/v2/models/{name}/ready", summary="Model readiness")
async def model_ready(request: Request, name: str, state: ServerState = Depends(get_state)):
    state.model(request, name)
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    model = state.model(request, name, version)
    return {"name": name, "version": str(model.version), "ready": True}


# The infer body is read by hand (JSON or binary tensors, maybe compressed), so FastAPI does not see its models:
# their schemas go into the document's components here, and document() adds them to the app's OpenAPI.
_SCHEMAS = {}


def _document(*models: type[BaseModel]) -> None:
    """The models' JSON schemas (and those they refer to) into _SCHEMAS, referred to as components."""
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        _SCHEMAS.update({**schema.pop("$defs", {}), model.__name__: schema})


_document(kserve.InferRequest, kserve.InferResponse)
# What this server's models take and give (the protocol itself allows any names), and an example that runs.
_SCHEMAS["InferRequest"]["properties"]["inputs"]["maxItems"] = 1
_SCHEMAS["InferRequest"]["properties"]["parameters"]["properties"].update({
    "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                  "description": "one exit threshold for every non-final stage, for this request"},
    "max_stage": {"type": "integer", "minimum": 0, "description": "stop at this stage at the latest"},
    "operating_point": {"type": "string", "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$",
                        "description": "the id of one of the version's operating points (`default` in every "
                                       "version): its thresholds and last stage for this request, which threshold "
                                       "and max_stage still override"}})
_SCHEMAS["TensorIn"]["properties"]["name"]["enum"] = list(INPUTS)
_SCHEMAS["OutputRequest"]["properties"]["name"]["enum"] = list(OUTPUTS)
_SCHEMAS["InferRequest"]["examples"] = [{  # one black 28 x 28 PNG; the model resizes any other size
    "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [
        "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAEElEQVR42mNgGAWjYBQQAwADLAAB1wvpfAAAAABJRU5ErkJggg=="]}],
    "outputs": [{"name": "class_id"}, {"name": "exit_stage"}, {"name": "flops"}]}]
_INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "JSON header (length in Inference-Header-Content-Length) followed by "
                                            "binary tensor data"}}}},
              "responses": {"200": {
                  "description": "The outputs: JSON, or with binary outputs a JSON header followed by their data",
                  "headers": {"Inference-Header-Content-Length": {
                      "description": "length of the JSON header (only when some output is binary)",
                      "schema": {"type": "integer"}}},
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}}


def document(app: FastAPI) -> None:
    """Adds the infer schemas (InferRequest, TensorIn, OutputRequest, InferResponse, TensorOut) to app's OpenAPI
    components, where the infer routes' request and response bodies refer to them."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = build().setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_SCHEMAS)
        return app.openapi_schema

    app.openapi = openapi


@router.post("/v2/models/{name}/infer", openapi_extra=_INFER_DOC, summary="Infer with the highest version")
async def infer(request: Request, name: str, state: ServerState = Depends(get_state)):
    return await _infer(request, state, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_INFER_DOC, summary="Infer with a version")
async def infer_version(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    return await _infer(request, state, name, version)


def _parameter(params: dict, key: str, kind: type):
    value = params.get(key)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(f"parameter {key!r} must be an integer, got {kserve.clip(value)!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise invalid(f"parameter {key!r} must be a number, got {kserve.clip(value)!r}")
    if kind is str and not isinstance(value, str):
        raise invalid(f"parameter {key!r} must be a string, got {kserve.clip(value)!r}")
    try:
        return kind(value)
    except OverflowError:  # an integer beyond any float
        raise invalid(f"parameter {key!r} is out of range, got an integer of {len(str(value))} digits") from None


def _outputs(req: kserve.InferRequest) -> list[tuple[str, bool]]:
    """The requested outputs (all when none is named) as (name, binary?). binary_data_output (the request's
    default) and each output's binary_data must be JSON booleans: a string such as "false" is refused, not read
    as true."""
    def flag(params: dict, key: str, default: bool, where: str = "") -> bool:
        value = params.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"parameter {key!r}{where} must be a JSON boolean (true or false), got "
                              f"{kserve.clip(value)!r}")
        return value

    binary_default = flag(req.parameters, "binary_data_output", False)
    wanted = req.outputs if req.outputs else [kserve.OutputRequest(name=o) for o in OUTPUTS]
    outputs = []
    for o in wanted:
        if o.name not in OUTPUTS:
            raise bad_request(f"unknown output {o.name!r} (outputs: {', '.join(OUTPUTS)})")
        outputs.append((o.name, flag(o.parameters, "binary_data", binary_default, f" of output {o.name!r}")))
    return outputs


async def _infer(request: Request, state: ServerState, name: str, version: str | None) -> Response:
    model = state.model(request, name, version)
    with admit(state, model) as admission:
        raw = await request.body()
        return await until_disconnected(request, _infer_body(request, state, model, admission, raw))


async def _infer_body(request: Request, state: ServerState, model: ServedModel, admission: Admission,
                      raw: bytes) -> Response:
    s = state.settings
    encoding, header_length = request.headers.get("content-encoding"), request.headers.get(kserve.HEADER_LENGTH)

    def parse():  # JSON tensors can be megabytes: parsed in a worker, not on the event loop
        return kserve.parse_request(kserve.decompress(raw, encoding, s.max_body_bytes), header_length)

    req, tensors = await state.decoding.run(parse)
    if len(tensors) != 1 or tensors[0].name not in INPUTS:
        raise bad_request(f"send exactly one input, 'images' (FP32 [N, C, H, W]) or 'image_bytes' (BYTES [N]); "
                          f"got {[t.name for t in tensors]}")
    t = tensors[0]
    if t.datatype != INPUTS[t.name]:
        raise invalid(f"input {t.name!r} must be {INPUTS[t.name]}, got {t.datatype}")
    n = t.shape[0] if t.shape else 0
    if n > s.max_images:
        raise too_large(f"batch of {n} images is over the limit of {s.max_images} (RESKD_MAX_IMAGES); split it")
    if n == 0:
        raise invalid(f"input {t.name!r} holds no images (shape {t.shape})")
    if t.name == "images":
        c, h, w = model.runtime.input_shape
        if t.shape[1:] != [c, h, w] or len(t.shape) != 4:
            raise invalid(f"input 'images' must have shape [N, {c}, {h}, {w}] for {model.name}, got {t.shape}")
        images = np.asarray(t.value, dtype=np.float32)
        if not np.isfinite(images).all():
            raise invalid("input 'images' holds NaN or infinite values; send normalised finite pixels")
    else:
        if len(t.shape) != 1:
            raise invalid(f"input 'image_bytes' must have shape [N], got {t.shape}")
        images = await decode_batch(state.decoding, t.value, [f"image_bytes[{i}]" for i in range(n)],
                                    model.manifest.input, s.max_pixels, s.max_request_pixels)
    threshold = _parameter(req.parameters, "threshold", float)
    max_stage = _parameter(req.parameters, "max_stage", int)
    point = _parameter(req.parameters, "operating_point", str)
    wanted = _outputs(req)
    result = await run_cascade(state, model, admission, images, threshold, max_stage, point)

    values = {"logits": result.logits, "class_id": result.class_id, "exit_stage": result.exit_stage,
              "flops": result.flops}
    outputs = [(name, OUTPUTS[name], values[name], binary) for name, binary in wanted]
    head = {"model_name": model.name, "model_version": str(model.version)}
    if req.id is not None:
        head["id"] = req.id
    content, header_length = kserve.encode_response(head, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


# --- model repository (Triton's model repository extension; service/control.py) ------------------------------
# Flags must be JSON booleans, as the infer request's are (a string such as "yes" is refused, not read as true).
class RepositoryIndexRequest(BaseModel):
    ready: StrictBool = Field(False, description="only versions ready to serve")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADING"]
    reason: str = Field(description="why the version is not READY: refused (the verification or warm-up "
                                    "failure), not loaded (yet), unloaded, being loaded, or draining")


class LoadRequest(BaseModel):
    parameters: dict[str, Any] = Field({}, json_schema_extra={"maxProperties": 0},
                                       description="none accepted: reskd loads versions from the repository (no "
                                                   "config or file overrides)")


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unload_dependents: StrictBool = Field(False, description="accepted for Triton's clients; reskd models have no "
                                                       "dependents")


class UnloadRequest(BaseModel):
    parameters: UnloadParameters = UnloadParameters()


_document(LoadRequest, UnloadRequest)  # bodies read by hand (optional, maybe empty)


async def _json_object(request: Request, model: type[BaseModel]):
    """An optional JSON object body (tritonclient sends an empty one for the index) as `model`; 400 otherwise."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise bad_request(f"invalid request body: {'; '.join(describe(err))}") from None


def _control_route(action: str, body: type[BaseModel], summary: str):
    """POST /v2/repository/models/{name}/<action>: an optional JSON body (`body`), an empty 200 when done."""
    return router.post(f"/v2/repository/models/{{name}}/{action}", response_class=Response, summary=summary,
                       responses={200: {"description": "done (empty body, as Triton answers)", "content": {}}},
                       openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                           "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}})


@router.post("/v2/repository/index", response_model=list[RepositoryIndexEntry],
             summary="Every version in the model repository, served or not, with its state")
async def repository_index(request: Request, state: ServerState = Depends(get_state)):
    body = await _json_object(request, RepositoryIndexRequest)
    return state.control.index(ready_only=body.ready)


@router.get("/v2/repository/index", response_model=list[RepositoryIndexEntry],
            summary="The repository index (GET form; POST is Triton's)")
async def repository_index_get(ready: bool = False, state: ServerState = Depends(get_state)):
    return state.control.index(ready_only=ready)


@_control_route("load", LoadRequest, "Load the model's versions as the repository holds them now "
                "(RESKD_MODEL_CONTROL=explicit): new and changed versions are verified and warmed before they take "
                "traffic")
async def repository_load(request: Request, name: str, state: ServerState = Depends(get_state)):
    body = await _json_object(request, LoadRequest)
    if body.parameters:
        raise bad_request(f"load parameters are not supported (got {', '.join(sorted(body.parameters))}): put the "
                          f"version folder, manifest.json last, into the model repository, then load")
    state.require_ready()
    await state.control.load(name)
    return Response(status_code=200)


@_control_route("unload", UnloadRequest, "Stop serving the model (RESKD_MODEL_CONTROL=explicit): new requests get "
                "404; requests already admitted finish first")
async def repository_unload(request: Request, name: str, state: ServerState = Depends(get_state)):
    await _json_object(request, UnloadRequest)
    state.require_ready()
    await state.control.unload(name)
    return Response(status_code=200)
