"""POST /v1/models/{name}[/versions/{v}]/classify and POST /v1/classify: images in (multipart `file` parts or a
raw image body; the format is sniffed from the bytes), one prediction with its compute figures per image out."""

from __future__ import annotations

import time

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from reskd.cascade import CascadeResult

from ..serving.decoding import decode_batch
from ..serving.errors import bad_request, too_large, unsupported
from ..serving.models import ServedModel
from ..serving.pipeline import admit, run_cascade
from ..serving.state import ServerState
from ..serving.tensors import probabilities
from . import multipart
from .deps import get_state, served
from .disconnects import until_disconnected
from .schemas import ERROR_RESPONSES, ClassifyResponse

router = APIRouter(tags=["classify"])

_BODY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": "one or more images (repeat the part); PNG, JPEG, WebP, BMP or GIF"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

# A raw body is sniffed, whatever it claims to be among these; curl --data-binary sends the last one by default.
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], list[str], list[str | None]]:
    """-> (blobs, names for error messages, filenames)."""
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        body = await request.body()
        try:
            parts = multipart.parse(body, ctype, max_parts=max_images + 100)
        except multipart.MultipartError as err:
            raise bad_request(f"malformed multipart body: {err}") from None
        files = [p for p in parts if p.name == "file"]
        if not files:
            got = ", ".join(sorted({p.name for p in parts})) or "no parts"
            raise bad_request(f"multipart body has no 'file' part (got: {got}); send each image as a 'file' part, "
                              f"e.g. curl -F file=@image.png")
        if len(files) > max_images:
            raise too_large(f"more than {max_images} images in one request (RESKD_MAX_IMAGES); split it")
        for i, part in enumerate(files):
            if part.filename is None:
                raise bad_request(f"part {i} ('file') is a text field, not a file upload; use curl -F file=@image.png")
        return ([p.data for p in files], [f"image {i} ({p.filename!r})" if p.filename else f"image {i}"
                                          for i, p in enumerate(files)], [p.filename or None for p in files])
    ctype = ctype.lower()
    if ctype and not ctype.startswith(RAW_TYPES):
        raise unsupported(f"content type {ctype.split(';')[0]!r} is not accepted: send multipart/form-data with "
                          f"'file' parts, or the image bytes with an image/* or application/octet-stream type")
    body = await request.body()
    if not body:
        raise bad_request("the request has no body: send an image (raw bytes) or multipart 'file' parts")
    return [body], ["image 0"], [None]


def response_body(model: ServedModel, result: CascadeResult, top_k: int, filenames: list[str | None]) -> bytes:
    """The ClassifyResponse as JSON bytes, built from the result's arrays in one pass of plain lists and dicts and
    encoded by orjson: the pydantic models, FastAPI's validation of them and the stdlib encoder cost about 23 us an
    image on the event loop (docs/serving.md, "HTTP overhead"). The fields and their types are the ClassifyResponse
    schema's; tests/test_serve_fuzz.py checks every response against it."""
    labels = model.manifest.labels
    k = min(top_k, len(labels))
    probs = probabilities(result)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top = zip(order.tolist(), np.take_along_axis(probs, order, -1).tolist())
    teacher, cascade = model.teacher_flops, model.cascade_flops
    predictions = [
        {"filename": name, "label": labels[cls], "class_id": cls, "confidence": confidence,
         "top_k": [{"label": labels[j], "class_id": j, "probability": p} for j, p in zip(ids, ps)],
         "exit_stage": stage, "exit_reason": reason, "stages_run": stage + 1, "flops": flops,
         "flops_saved_vs_teacher": teacher - flops, "flops_saved_vs_cascade": cascade - flops}
        for name, cls, confidence, (ids, ps), stage, reason, flops in zip(
            filenames, result.class_id.tolist(), result.confidence.tolist(), top, result.exit_stage.tolist(),
            result.reasons(), result.flops.tolist())]
    figures = result.point_figures
    point = {"id": result.point or "custom",
             "accuracy": figures.accuracy if result.point is not None and figures is not None else None}
    return orjson.dumps({"model": model.name, "version": model.version, "operating_point": point,
                         "predictions": predictions})


async def _classify(request: Request, state: ServerState, name: str, version: str | None, top_k: int,
                    threshold: float | None, max_stage: int | None, point: str | None, degrade: bool,
                    timeout_ms: float | None) -> Response:
    model = served(request, state, name, version)
    s = state.settings
    with admit(state, model) as admission:
        start = time.perf_counter()
        blobs, names, filenames = await read_images(request, s.max_images)

        async def classify() -> CascadeResult:
            images = await decode_batch(state.decoding, blobs, names, model.manifest.input, s.max_pixels,
                                        s.max_request_pixels)
            model.metrics.phase("input", time.perf_counter() - start)
            return await run_cascade(state, model, admission, images, threshold, max_stage, point, degrade=degrade,
                                     timeout_s=timeout_ms / 1000 if timeout_ms else None)

        result = await until_disconnected(request, classify())
    start = time.perf_counter()
    body = response_body(model, result, top_k, filenames)
    model.metrics.phase("output", time.perf_counter() - start)
    return Response(body, media_type="application/json")


TopK = Query(1, ge=1, description="how many classes to list per image (capped at the number of classes)")
Threshold = Query(None, ge=0.0, le=1.0, description="one exit threshold for every non-final stage, replacing the "
                                                    "calibrated ones for this request")
MaxStage = Query(None, ge=0, description="stop at this stage at the latest (0 = the student)")
Point = Query(None, alias="operating_point", max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
              description="the id of one of the version's operating points (its thresholds and last stage, from "
                          "its manifest; GET /v2/models/{name} lists them; `default` in every version) instead "
                          "of the calibrated ones; threshold and max_stage, when given, still override it")
Degrade = Query(True, description="false: under load, run at the point asked for (the default one) or get 503, "
                                  "never at a cheaper point the server chose")
TimeoutMs = Query(None, ge=0, allow_inf_nan=False,
                  description="the request's deadline in milliseconds after it is admitted (0: none): images still "
                              "waiting for a later stage then are answered from the stages they ran (exit_reason "
                              "deadline); 504 if some ran none")
COMMON = dict(response_model=ClassifyResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY_DOC)


@router.post("/v1/models/{name}/classify", **COMMON, summary="Classify images with the highest version")
async def classify(request: Request, name: str, top_k: int = TopK, threshold: float | None = Threshold,
                   max_stage: int | None = MaxStage, point: str | None = Point, degrade: bool = Degrade,
                   timeout_ms: float | None = TimeoutMs, state: ServerState = Depends(get_state)):
    return await _classify(request, state, name, None, top_k, threshold, max_stage, point, degrade, timeout_ms)


@router.post("/v1/models/{name}/versions/{version}/classify", **COMMON, summary="Classify images with one version")
async def classify_version(request: Request, name: str, version: str, top_k: int = TopK,
                           threshold: float | None = Threshold, max_stage: int | None = MaxStage,
                           point: str | None = Point, degrade: bool = Degrade, timeout_ms: float | None = TimeoutMs,
                           state: ServerState = Depends(get_state)):
    return await _classify(request, state, name, version, top_k, threshold, max_stage, point, degrade, timeout_ms)


@router.post("/v1/classify", **COMMON, summary="Classify images with the default model (RESKD_DEFAULT_MODEL)")
async def classify_default(request: Request, top_k: int = TopK, threshold: float | None = Threshold,
                           max_stage: int | None = MaxStage, point: str | None = Point, degrade: bool = Degrade,
                           timeout_ms: float | None = TimeoutMs, state: ServerState = Depends(get_state)):
    return await _classify(request, state, state.settings.default_model, None, top_k, threshold, max_stage, point,
                           degrade, timeout_ms)
