"""POST /v1/models/{name}[/versions/{v}]/classify and POST /v1/classify: images in (multipart `file` parts or a
raw image body; the format is sniffed from the bytes), one prediction with its compute figures per image out."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from reskd.cascade import CascadeResult

from .decoding import decode_batch
from .errors import bad_request, too_large, unsupported
from .models import ServedModel
from .pipeline import admit, run_cascade, until_disconnected
from .schemas import ERROR_RESPONSES, ClassifyResponse, Prediction, TopClass
from .state import ServerState, get_state

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
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_images + 1, max_fields=100)
        except MultiPartException as err:
            raise bad_request(f"malformed multipart body: {err.message}") from None
        try:
            parts = form.getlist("file")
            if not parts:
                got = ", ".join(sorted(set(form.keys()))) or "no parts"
                raise bad_request(f"multipart body has no 'file' part (got: {got}); send each image as a "
                                  f"'file' part, e.g. curl -F file=@image.png")
            if len(parts) > max_images:
                raise too_large(f"more than {max_images} images in one request (RESKD_MAX_IMAGES); split it")
            blobs, names, filenames = [], [], []
            for i, part in enumerate(parts):
                if not isinstance(part, UploadFile):
                    raise bad_request(f"part {i} ('file') is a text field, not a file upload; use "
                                      f"curl -F file=@image.png")
                blobs.append(await part.read())
                names.append(f"image {i} ({part.filename!r})" if part.filename else f"image {i}")
                filenames.append(part.filename)
            return blobs, names, filenames
        finally:
            await form.close()
    if ctype and not ctype.startswith(RAW_TYPES):
        raise unsupported(f"content type {ctype.split(';')[0]!r} is not accepted: send multipart/form-data with "
                          f"'file' parts, or the image bytes with an image/* or application/octet-stream type")
    body = await request.body()
    if not body:
        raise bad_request("the request has no body: send an image (raw bytes) or multipart 'file' parts")
    return [body], ["image 0"], [None]


def predictions(model: ServedModel, result: CascadeResult, top_k: int,
                filenames: list[str | None]) -> list[Prediction]:
    labels = model.manifest.labels
    k = min(top_k, len(labels))
    logits = result.logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    out = []
    for i in range(len(result)):
        cls, flops = int(result.class_id[i]), int(result.flops[i])
        out.append(Prediction(
            filename=filenames[i], label=labels[cls], class_id=cls, confidence=float(result.confidence[i]),
            top_k=[TopClass(label=labels[j], class_id=int(j), probability=float(probs[i, j])) for j in order[i]],
            exit_stage=int(result.exit_stage[i]), stages_run=int(result.exit_stage[i]) + 1, flops=flops,
            flops_saved_vs_teacher=model.teacher_flops - flops, flops_saved_vs_cascade=model.cascade_flops - flops))
    return out


async def _classify(request: Request, state: ServerState, name: str, version: str | None, top_k: int,
                    threshold: float | None, max_stage: int | None) -> ClassifyResponse:
    model = state.model(request, name, version)
    s = state.settings
    with admit(state, model) as admission:
        blobs, names, filenames = await read_images(request, s.max_images)

        async def classify() -> CascadeResult:
            images = await decode_batch(state.decoding, blobs, names, model.manifest.input, s.max_pixels,
                                        s.max_request_pixels)
            return await run_cascade(state, model, admission, images, threshold, max_stage)

        result = await until_disconnected(request, classify())
    return ClassifyResponse(model=model.name, version=model.version,
                            predictions=predictions(model, result, top_k, filenames))


TopK = Query(1, ge=1, description="how many classes to list per image (capped at the number of classes)")
Threshold = Query(None, ge=0.0, le=1.0, description="one exit threshold for every non-final stage, replacing the "
                                                    "calibrated ones for this request")
MaxStage = Query(None, ge=0, description="stop at this stage at the latest (0 = the student)")
COMMON = dict(response_model=ClassifyResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY_DOC)


@router.post("/v1/models/{name}/classify", **COMMON, summary="Classify images with the highest version")
async def classify(request: Request, name: str, top_k: int = TopK, threshold: float | None = Threshold,
                   max_stage: int | None = MaxStage, state: ServerState = Depends(get_state)):
    return await _classify(request, state, name, None, top_k, threshold, max_stage)


@router.post("/v1/models/{name}/versions/{version}/classify", **COMMON, summary="Classify images with one version")
async def classify_version(request: Request, name: str, version: str, top_k: int = TopK,
                           threshold: float | None = Threshold, max_stage: int | None = MaxStage,
                           state: ServerState = Depends(get_state)):
    return await _classify(request, state, name, version, top_k, threshold, max_stage)


@router.post("/v1/classify", **COMMON, summary="Classify images with the default model (RESKD_DEFAULT_MODEL)")
async def classify_default(request: Request, top_k: int = TopK, threshold: float | None = Threshold,
                           max_stage: int | None = MaxStage, state: ServerState = Depends(get_state)):
    return await _classify(request, state, state.settings.default_model, None, top_k, threshold, max_stage)
