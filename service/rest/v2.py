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

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response


from ..serving import describe, pipeline
from ..serving.errors import bad_request
from ..serving.models import ServedModel
from ..serving.pipeline import Wanted, admit, wanted_outputs
from ..serving.scheduler import Admission
from ..serving.state import ServerState
from ..serving.statistics import model_statistics
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
    return describe.server_metadata()


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
    return describe.model_metadata(model, state.store.versions(name))


@router.get("/v2/models/{name}/versions/{version}", summary="Metadata of one model version")
async def model_version_metadata(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    model = served(request, state, name, version)
    return describe.model_metadata(model, state.store.versions(name))


@router.get("/v2/models/{name}/config", summary="Model configuration (Triton's JSON form)")
async def model_config(request: Request, name: str, state: ServerState = Depends(get_state)):
    return describe.model_config(served(request, state, name), state.settings)


@router.get("/v2/models/{name}/versions/{version}/config", summary="Configuration of one model version")
async def model_version_config(request: Request, name: str, version: str, state: ServerState = Depends(get_state)):
    return describe.model_config(served(request, state, name, version), state.settings)


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


def _outputs(req: kserve.InferRequest) -> tuple[list[Wanted], list[bool]]:
    """The requested outputs (all when none is named) and whether each goes as binary data. binary_data_output (the
    request's default) and each output's binary_data must be JSON booleans: a string such as "false" is refused,
    not read as true. `classification` (Triton's extension, on an output with a class axis) must be a JSON integer
    >= 1 (pipeline.wanted_outputs)."""
    def flag(params: dict, key: str, default: bool, where: str = "") -> bool:
        value = params.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"parameter {key!r}{where} must be a JSON boolean (true or false), got "
                              f"{kserve.clip(value)!r}")
        return value

    binary_default = flag(req.parameters, "binary_data_output", False)
    wanted = wanted_outputs([(o.name, o.parameters.get("classification")) for o in req.outputs or []])
    given = {o.name: o.parameters for o in req.outputs or []}
    return wanted, [flag(given.get(w.name, {}), "binary_data", binary_default, f" of output {w.name!r}")
                    for w in wanted]


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
    wanted, binary = _outputs(req)
    answer = await pipeline.infer(state, model, admission, tensors, req.parameters, wanted, start)

    start = time.perf_counter()
    head = {"model_name": model.name, "model_version": str(model.version)}
    if req.id is not None:
        head["id"] = req.id
    head["parameters"] = answer.parameters
    content, header_length = kserve.encode_response(head, [(*o, b) for o, b in zip(answer.outputs, binary)])
    model.metrics.phase("output", time.perf_counter() - start)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})
