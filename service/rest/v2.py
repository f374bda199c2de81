"""KServe v2 / Triton HTTP endpoints: health, server and model metadata, model config, readiness, infer.

The tensors are service/serving/tensors.py's (`image_bytes` as base64 strings when sent as JSON); the request
parameters `threshold`, `max_stage` and `operating_point` act as the v1 query parameters do; `degrade` (a boolean: false keeps
the request at the point it asked for under load) and `timeout` (Triton's: microseconds from admission to the
request's deadline; 0, none) as v1's `degrade` and `timeout_ms`. The response's `parameters` name the operating
point the request ran at and its validation accuracy; the `exit_reason` output says why each image left. The infer bodies are
documented in the OpenAPI by service/rest/openapi.py; Triton's repository extension is service/rest/repository.py.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

import reskd

from ..serving.decoding import decode_batch
from ..serving.errors import bad_request, invalid, too_large
from ..serving.models import ServedModel
from ..serving.pipeline import admit, run_cascade
from ..serving.scheduler import Admission
from ..serving.state import ServerState
from ..serving.statistics import model_statistics
from ..serving.tensors import INPUTS, OUTPUTS, classify
from . import kserve
from .deps import get_state, served
from .disconnects import until_disconnected
from .openapi import INFER_DOC
from .schemas import ERROR_RESPONSES

router = APIRouter(tags=["kserve v2"], responses=ERROR_RESPONSES)


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
            "extensions": ["binary_tensor_data", "classification", "model_configuration", "model_repository",
                           "statistics", "reskd_early_exit"]}


def _metadata(model: ServedModel, versions: list[int]) -> dict:
    m = model.manifest
    cum = model.runtime.cum_flops.tolist()
    return {
        "name": model.name, "versions": [str(v) for v in versions], "platform": "reskd_cascade",
        "inputs": [t.metadata(model) for t in INPUTS.values()],
        "outputs": [t.metadata(model) for t in OUTPUTS.values()],
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


# The statistics extension (service/serving/statistics.py), before the metadata routes: /v2/models/stats is not a
# model named "stats".
@router.get("/v2/models/stats", summary="Statistics of every served version (Triton's statistics extension)")
async def all_statistics(state: ServerState = Depends(get_state)):
    state.require_ready()
    state.control.sync()
    return model_statistics(state.metrics, [(m.name, m.version, m.runtime.num_stages) for m in
                                            sorted(state.store.all(), key=lambda m: (m.name, m.version))])


@router.get("/v2/models/{name}/stats", summary="Statistics of every served version of a model")
async def statistics_of_model(request: Request, name: str, state: ServerState = Depends(get_state)):
    served(request, state, name)  # 404 for a model not served
    models = [state.store.get(name, v) for v in state.store.versions(name)]
    return model_statistics(state.metrics, [(m.name, m.version, m.runtime.num_stages) for m in models])


@router.get("/v2/models/{name}/versions/{version}/stats", summary="Statistics of one model version")
async def statistics_of_version(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    m = served(request, state, name, version)
    return model_statistics(state.metrics, [(m.name, m.version, m.runtime.num_stages)])


@router.get("/v2/models/{name}", summary="Model metadata: versions, tensors, stages, thresholds, FLOPs")
async def model_metadata(request: Request, name: str, state: ServerState = Depends(get_state)):
    model = served(request, state, name)
    return _metadata(model, state.store.versions(name))


@router.get("/v2/models/{name}/versions/{version}", summary="Metadata of one model version")
async def model_version_metadata(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    model = served(request, state, name, version)
    return _metadata(model, state.store.versions(name))


def _config(model: ServedModel, state: ServerState) -> dict:
    """Triton's model configuration (JSON form), describing what this server really does."""
    s = state.settings
    return {
        "name": model.name, "platform": "reskd_cascade", "backend": "onnxruntime",
        "version_policy": {"all": {}},
        "max_batch_size": s.max_images,
        "input": [t.config(model) for t in INPUTS.values()],
        "output": [t.config(model) for t in OUTPUTS.values()],
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
    return _config(served(request, state, name), state)


@router.get("/v2/models/{name}/versions/{version}/config", summary="Configuration of one model version")
async def model_version_config(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    return _config(served(request, state, name, version), state)


@router.get("/v2/models/{name}/ready", summary="Model readiness")
async def model_ready(request: Request, name: str, state: ServerState = Depends(get_state)):
    served(request, state, name)
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    model = served(request, state, name, version)
    return {"name": name, "version": str(model.version), "ready": True}


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_DOC, summary="Infer with the highest version")
async def infer(request: Request, name: str, state: ServerState = Depends(get_state)):
    return await _infer(request, state, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_DOC, summary="Infer with a version")
async def infer_version(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    return await _infer(request, state, name, version)


def point_parameters(result) -> dict:
    """The response's parameters: the operating point the request ran at (its id, or "custom" for the client's own
    threshold or max_stage) and that point's validation accuracy (absent where the manifest has none)."""
    params = {"operating_point": result.point or "custom"}
    figures = result.point_figures
    if result.point is not None and figures is not None and figures.accuracy is not None:
        params["operating_point_accuracy"] = figures.accuracy
    return params


def _parameter(params: dict, key: str, kind: type):
    value = params.get(key)
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise invalid(f"parameter {key!r} must be a boolean (true or false), got {kserve.clip(value)!r}")
        return value
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


def _outputs(req: kserve.InferRequest) -> list[tuple[str, bool, int | None]]:
    """The requested outputs (all when none is named) as (name, binary?, classification k or None). binary_data_output
    (the request's default) and each output's binary_data must be JSON booleans: a string such as "false" is
    refused, not read as true. `classification` (Triton's extension, on an output with a class axis) must be a
    JSON integer >= 1."""
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
        k = o.parameters.get("classification")
        if k is not None:
            if not OUTPUTS[o.name].per_class:
                raise bad_request(f"parameter 'classification' of output {o.name!r}: only an output with a class "
                                  f"axis can be classified ({', '.join(n for n, t in OUTPUTS.items() if t.per_class)})")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise bad_request(f"parameter 'classification' of output {o.name!r} must be a JSON integer >= 1 (how "
                                  f"many classes to list), got {kserve.clip(k)!r}")
        outputs.append((o.name, flag(o.parameters, "binary_data", binary_default, f" of output {o.name!r}"), k))
    return outputs


async def _infer(request: Request, state: ServerState, name: str, version: str | None) -> Response:
    model = served(request, state, name, version)
    with admit(state, model) as admission:
        start = time.perf_counter()
        raw = await request.body()
        return await until_disconnected(request, _infer_body(request, state, model, admission, raw, start))


async def _infer_body(request: Request, state: ServerState, model: ServedModel, admission: Admission,
                      raw: bytes, start: float) -> Response:
    s = state.settings
    encoding, header_length = request.headers.get("content-encoding"), request.headers.get(kserve.HEADER_LENGTH)

    def parse():  # JSON tensors can be megabytes: parsed in a worker, not on the event loop
        return kserve.parse_request(kserve.decompress(raw, encoding, s.max_body_bytes), header_length)

    req, tensors = await state.decoding.run(parse)
    if len(tensors) != 1 or tensors[0].name not in INPUTS:
        raise bad_request(f"send exactly one input, 'images' (FP32 [N, C, H, W]) or 'image_bytes' (BYTES [N]); "
                          f"got {[t.name for t in tensors]}")
    t = tensors[0]
    if t.datatype != INPUTS[t.name].datatype:
        raise invalid(f"input {t.name!r} must be {INPUTS[t.name].datatype}, got {t.datatype}")
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
    degrade = _parameter(req.parameters, "degrade", bool)
    timeout_us = _parameter(req.parameters, "timeout", float)
    if timeout_us is not None and not 0 <= timeout_us < float("inf"):
        raise invalid(f"parameter 'timeout' must be a number of microseconds >= 0 (0: no deadline), got "
                      f"{kserve.clip(req.parameters['timeout'])!r}")
    wanted = _outputs(req)
    model.metrics.phase("input", time.perf_counter() - start)
    result = await run_cascade(state, model, admission, images, threshold, max_stage, point,
                               degrade=degrade is not False, timeout_s=timeout_us / 1e6 if timeout_us else None)

    start = time.perf_counter()
    labels = model.manifest.labels
    outputs = [(name, "BYTES", classify(np.asarray(OUTPUTS[name].value(result)), k, labels), binary) if k else
               (name, OUTPUTS[name].datatype, OUTPUTS[name].value(result), binary) for name, binary, k in wanted]
    head = {"model_name": model.name, "model_version": str(model.version)}
    if req.id is not None:
        head["id"] = req.id
    head["parameters"] = point_parameters(result)
    content, header_length = kserve.encode_response(head, outputs)
    model.metrics.phase("output", time.perf_counter() - start)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})
