"""The path every inference request takes, whatever its protocol, from admission to results.

1. Admission, before the body is read: a model whose queue (with room reserved for requests already being read)
   is full is refused at once (503 + Retry-After), so under overload a refusal costs microseconds, not a body's
   read, parse and decode.
2. The body is read and the images decoded (service/serving/decoding.py).
3. The cascade runs through the model's scheduler; its failures become ServingErrors here, in one place.
The front end watches the client meanwhile (service/rest/disconnects.py): if it goes away, decoding stops, its
samples still queued are dropped (reskd_dropped_images_total), and the request is counted with code 499, not as a
server error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, TypeVar

import numpy as np

from reskd.cascade import CascadeInputError, CascadeResult

from .decoding import decode_batch
from .errors import bad_request, deadline_exceeded, internal, invalid, too_large, unavailable
from .models import ServedModel
from .scheduler import Admission, DeadlineExceeded, InferenceFailed, NeverFits, QueueFull
from .state import ServerState
from .tensors import INPUTS, OUTPUTS, classify
from .wire import clip

T = TypeVar("T")


class ClientGone(Exception):
    """The client went away before its answer was ready; its work was cancelled."""


def admit(state: ServerState, model: ServedModel) -> Admission:
    """503 + Retry-After when the model's queue is full or its expected wait over the limit (CascadeScheduler.admit);
    the Admission is a context manager."""
    try:
        return model.scheduler.admit()
    except QueueFull as err:
        raise unavailable(str(err), state.settings.retry_after_s) from None


async def run_cascade(state: ServerState, model: ServedModel, admission: Admission, images: np.ndarray,
                      threshold: float | None, max_stage: int | None, point: str | None = None, *,
                      degrade: bool = True, timeout_s: float | None = None) -> CascadeResult:
    """Queue and inference. threshold and max_stage (or an operating point of the version instead) are checked
    where they are used, by the runtime (CascadeInputError -> 422); more images than the queue ever holds -> 413; a
    batch that failed on the server's side -> 500; a deadline (timeout_s after admission) that passed before some
    images ran any stage -> 504. degrade=False: never run at a cheaper point than asked for."""
    gauge = model.metrics.inflight
    gauge.inc()
    try:
        future = model.scheduler.submit(images, threshold, max_stage, admission, point=point, degrade=degrade,
                                        timeout_s=timeout_s)
        return await future
    except NeverFits as err:
        raise too_large(str(err)) from None
    except QueueFull as err:
        raise unavailable(str(err), state.settings.retry_after_s) from None
    except CascadeInputError as err:
        raise invalid(f"{err} ({model.name} version {model.version})") from None
    except InferenceFailed as err:
        raise internal(str(err)) from None
    except DeadlineExceeded as err:
        raise deadline_exceeded(str(err)) from None
    finally:
        gauge.dec()


async def until_gone(work: Awaitable[T], gone: Awaitable[None]) -> T:
    """Run `work`; if `gone` (the front end's watch on the client) finishes first, cancel the work and raise
    ClientGone. Cancelled from outside (the server shutting down, not the client's doing), both are cancelled."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(gone)
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


# --- one KServe v2 inference request, whatever carries it (HTTP: service/rest/v2.py; gRPC: service/rpc) -----------
@dataclass
class InputTensor:
    """An input tensor as a front end decoded it: numbers as an array of the shape, BYTES as a list of elements."""
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]


@dataclass(frozen=True)
class Wanted:
    """An output the request asked for; classification: Triton's extension, its top k classes instead."""
    name: str
    classification: int | None = None


@dataclass
class Answer:
    result: CascadeResult
    outputs: list[tuple[str, str, Any]]  # (name, datatype, value) in the order asked for
    parameters: dict[str, Any]  # the response's: the operating point it ran at and that point's accuracy


def wanted_outputs(requested: list[tuple[str, Any]]) -> list[Wanted]:
    """requested: (output name, its `classification` parameter or None); none at all: every output. An unknown
    name, or a classification that is not an integer >= 1 or asked of an output without a class axis: 400."""
    if not requested:
        return [Wanted(name) for name in OUTPUTS]
    wanted = []
    for name, k in requested:
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {clip(name)!r} (outputs: {', '.join(OUTPUTS)})")
        if k is not None:
            if not OUTPUTS[name].per_class:
                raise bad_request(f"parameter 'classification' of output {name!r}: only an output with a class "
                                  f"axis can be classified ({', '.join(n for n, t in OUTPUTS.items() if t.per_class)})")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise bad_request(f"parameter 'classification' of output {name!r} must be an integer >= 1 (how many "
                                  f"classes to list), got {clip(k)!r}")
        wanted.append(Wanted(name, k))
    return wanted


def _parameter(params: dict, key: str, kind: type):
    value = params.get(key)
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise invalid(f"parameter {key!r} must be a boolean (true or false), got {clip(value)!r}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(f"parameter {key!r} must be an integer, got {clip(value)!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise invalid(f"parameter {key!r} must be a number, got {clip(value)!r}")
    if kind is str and not isinstance(value, str):
        raise invalid(f"parameter {key!r} must be a string, got {clip(value)!r}")
    try:
        return kind(value)
    except OverflowError:  # an integer beyond any float
        raise invalid(f"parameter {key!r} is out of range, got an integer of {len(str(value))} digits") from None


# The request parameters that set how the cascade runs, and their types.
EXIT_PARAMETERS = {"threshold": float, "max_stage": int, "operating_point": str, "degrade": bool, "timeout": float}


async def images_of(state: ServerState, model: ServedModel, tensors: list[InputTensor]) -> np.ndarray:
    """The request's one input as the model's images: `images` checked (shape, finite), `image_bytes` decoded."""
    s = state.settings
    if len(tensors) != 1 or tensors[0].name not in INPUTS:
        raise bad_request(f"send exactly one input, 'images' (FP32 [N, C, H, W]) or 'image_bytes' (BYTES [N]); "
                          f"got {[clip(t.name) for t in tensors]}")
    t = tensors[0]
    if t.datatype != INPUTS[t.name].datatype:
        raise invalid(f"input {t.name!r} must be {INPUTS[t.name].datatype}, got {clip(t.datatype)}")
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
        return images
    if len(t.shape) != 1:
        raise invalid(f"input 'image_bytes' must have shape [N], got {t.shape}")
    return await decode_batch(state.decoding, t.value, [f"image_bytes[{i}]" for i in range(n)],
                              model.manifest.input, s.max_pixels, s.max_request_pixels)


def point_parameters(result: CascadeResult) -> dict:
    """The response's parameters: the operating point the request ran at (its id, or "custom" for the client's own
    threshold or max_stage) and that point's validation accuracy (absent where the manifest has none)."""
    params: dict[str, Any] = {"operating_point": result.point or "custom"}
    figures = result.point_figures
    if result.point is not None and figures is not None and figures.accuracy is not None:
        params["operating_point_accuracy"] = figures.accuracy
    return params


async def infer(state: ServerState, model: ServedModel, admission: Admission, tensors: list[InputTensor],
                params: dict, wanted: list[Wanted], start: float, deadline_s: float | None = None) -> Answer:
    """A KServe v2 request whose body was read at `start` (perf_counter), from its tensors to its outputs: the
    images, the exit parameters (`threshold`, `max_stage`, `operating_point`, `degrade`; `timeout`: Triton's
    microseconds from admission to the deadline, 0 none), the cascade, the outputs asked for. deadline_s: a deadline
    the protocol itself carries (gRPC's), seconds from now; the earlier of it and `timeout` holds."""
    images = await images_of(state, model, tensors)
    threshold = _parameter(params, "threshold", float)
    max_stage = _parameter(params, "max_stage", int)
    point = _parameter(params, "operating_point", str)
    degrade = _parameter(params, "degrade", bool)
    timeout_us = _parameter(params, "timeout", float)
    if timeout_us is not None and not 0 <= timeout_us < float("inf"):
        raise invalid(f"parameter 'timeout' must be a number of microseconds >= 0 (0: no deadline), got "
                      f"{clip(params['timeout'])!r}")
    timeout_s = timeout_us / 1e6 if timeout_us else None
    if deadline_s is not None:
        timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
    model.metrics.phase("input", time.perf_counter() - start)
    result = await run_cascade(state, model, admission, images, threshold, max_stage, point,
                               degrade=degrade is not False, timeout_s=timeout_s)
    labels = model.manifest.labels
    outputs = [(w.name, "BYTES", classify(np.asarray(OUTPUTS[w.name].value(result)), w.classification, labels))
               if w.classification else (w.name, OUTPUTS[w.name].datatype, OUTPUTS[w.name].value(result))
               for w in wanted]
    return Answer(result, outputs, point_parameters(result))
