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
from typing import Awaitable, TypeVar

import numpy as np

from reskd.cascade import CascadeInputError, CascadeResult

from .errors import deadline_exceeded, internal, invalid, too_large, unavailable
from .models import ServedModel
from .scheduler import Admission, DeadlineExceeded, InferenceFailed, NeverFits, QueueFull
from .state import ServerState

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
