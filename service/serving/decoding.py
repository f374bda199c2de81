"""Encoded images -> one float32 batch, in worker threads (never on the event loop). The conversion itself is
reskd.preprocess, the same code batch scoring uses.

Fairness: the decoding threads take a turn at a time from the requests waiting, in turn (round robin), a turn being
a request's next images up to DECODE_TURN_PIXELS (at least one image): a request of 256 large images holds one
thread for one image at a time, so a one-image request arriving behind it waits for at most the turns already
running, not for the whole queue. Before any pixel is decoded, the request's image headers are read (once: the
opened images are then decoded) and their sizes summed against the per-request budget (RESKD_MAX_REQUEST_PIXELS):
a request that would decode more gets 413 at once. Memory: `reskd serve` keeps large image buffers mmap()ed
(`release_large_allocations`) and a thread's heap is trimmed after an image over DECODED_TRIM_PIXELS, so a burst of
large images does not leave the process holding its peak; reskd.preprocess.shrink converts a large image at twice
the model's input size, not at its own.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import threading
from typing import Any, Callable, TypeVar

import numpy as np
from PIL import Image

from reskd.manifest import InputSpec
from reskd.preprocess import ImageError, ImageTooLarge, normalise, open_image, opened_to_pixels

from .errors import too_large, unsupported

T = TypeVar("T")


class _Job:
    """One request's items, handed to the threads a turn at a time. Its counters change under the pool's lock."""

    def __init__(self, fn: Callable, items: list, weights: list[int], turn: int, future: asyncio.Future | None):
        self.fn, self.items, self.weights, self.turn, self.future = fn, items, weights, turn, future
        self.loop = future.get_loop() if future is not None else None
        self.results: list[Any] = [None] * len(items)
        self.next = 0  # the next item to hand out
        self.finished = 0  # items whose results are in
        self.stopped = False  # failed, completed or given up: no more turns

    @property
    def exhausted(self) -> bool:
        return self.stopped or self.next >= len(self.items)

    def take(self, budget: int) -> tuple[int, int]:
        """The next turn: consecutive items up to `budget` in weight, at least one. -> (start, stop)."""
        start = stop = self.next
        spent = 0
        while stop < len(self.items) and (stop == start or spent + self.weights[stop] <= budget):
            spent += self.weights[stop]
            stop += 1
        self.next = stop
        return start, stop

    def settle(self, error: BaseException | None) -> None:
        """On the event loop: the job's outcome, once."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(self.results)


class DecodePool:
    """Worker threads shared by every request, each request's items served in turn (see the module's doc). The
    threads take their next turn from the ring themselves: the event loop hears from the pool once per request
    (its results or its first error), not once per turn. (A pump on the loop that handed out each turn starved the
    threads while the loop was busy: single-image requests at concurrency 64 were served at 58% of the rate.)"""

    def __init__(self, workers: int):
        self.ring: collections.deque[_Job] = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"reskd-decode_{i}", daemon=True)
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    async def map(self, fn: Callable, items: list, weights: list[int] | None = None, turn: int = 1) -> list:
        """[fn(item) for item in items] in the threads, in turn with other requests': each turn runs this call's
        next items up to `turn` in weight (at least one item; weight 1 each by default), then every other waiting
        call has its turn. The first exception raised by fn fails the call at once (items not started are not
        run). Cancelling the call stops handing out its items."""
        if not items:
            return []
        job = _Job(fn, items, weights or [1] * len(items), turn, asyncio.get_running_loop().create_future())
        with self.lock:
            if self.closed:
                raise RuntimeError("the decoding pool is shut down")
            self.ring.append(job)
            self.lock.notify()
        try:
            return await job.future
        finally:
            with self.lock:
                job.stopped = True
                if job in self.ring:
                    self.ring.remove(job)

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() in a thread, in turn with the requests' images."""
        (result,) = await self.map(lambda _: fn(), [None])
        return result

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.ring and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                job = self.ring.popleft()
                if job.exhausted:
                    continue
                start, stop = job.take(job.turn)
                if not job.exhausted:
                    self.ring.append(job)  # its next turn waits for every other request's
                    self.lock.notify()
            try:
                results, error = [job.fn(item) for item in job.items[start:stop]], None
            except BaseException as err:  # the request's first error fails it; its other items are not started
                results, error = None, err
            with self.lock:
                if error is None:
                    job.results[start:stop] = results
                    job.finished += stop - start
                # Settled once: at its first error, or when its last item is in; not once failed or given up.
                if job.stopped or error is None and job.finished < len(job.items):
                    continue
                job.stopped = True
            try:
                job.loop.call_soon_threadsafe(job.settle, error)
            except RuntimeError:  # the loop is closed: nobody waits for the result
                pass

    def shutdown(self) -> None:
        """Stop the threads after their current turn; calls still waiting are cancelled."""
        with self.lock:
            self.closed = True
            waiting = list(self.ring)
            self.ring.clear()
            self.lock.notify_all()
        for job in waiting:
            if not job.stopped:
                job.stopped = True
                try:
                    job.loop.call_soon_threadsafe(job.future.cancel)
                except RuntimeError:
                    pass


def _open(blobs: list[bytes], max_pixels: int) -> list[Image.Image | ImageError]:
    """Each image's header read (nothing decoded): the opened image, or why it cannot be read."""
    opened = []
    for blob in blobs:
        try:
            opened.append(open_image(blob, max_pixels))
        except ImageError as err:
            opened.append(err)
    return opened


# A request's turn on a decoding thread: its next images up to this many pixels (at least one image). Small images
# go many to a turn (a 256-image request of 28 x 28 images is one task, not 256 round trips through the event loop);
# a large image is a turn of its own. About 10-20 ms of decoding: what another request may wait behind one turn.
DECODE_TURN_PIXELS = 1_000_000
# Images above this many pixels are freed back to the system after decoding (a 28x28 image is 784 pixels).
DECODED_TRIM_PIXELS = 4_000_000
_libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
_malloc_trim = getattr(_libc, "malloc_trim", None)


def release_large_allocations() -> None:
    """glibc keeps freed heap memory for reuse and raises its mmap threshold as large blocks come and go, so the
    blocks Pillow decodes a large image into end up in the heap and stay resident after a burst. A fixed threshold
    of 1 MiB keeps every such block mmap()ed, returned to the system when freed. No-op off glibc."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        M_MMAP_THRESHOLD = -3
        mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _to_input(item: tuple[str, Image.Image], spec: InputSpec) -> np.ndarray:
    """An opened image (named for messages) -> float32 [C, H, W], as reskd.preprocess.preprocess."""
    name, img = item
    pixels = img.width * img.height
    try:
        return normalise(opened_to_pixels(img, spec), spec)
    except ImageError as err:
        raise _refuse(name, err) from None
    finally:
        img.close()  # its decoded pixels, now converted: the request's list of opened images keeps the object
        if pixels > DECODED_TRIM_PIXELS and _malloc_trim is not None:
            _malloc_trim(0)  # what the large decode freed in this thread's arena goes back to the system


def _refuse(name: str, err: ImageError):
    return too_large(f"{name}: {err}") if isinstance(err, ImageTooLarge) else unsupported(f"{name}: {err}")


async def decode_batch(pool: DecodePool, blobs: list[bytes], names: list[str], spec: InputSpec,
                       max_pixels: int, max_request_pixels: int) -> np.ndarray:
    """-> float32 [N, C, H, W]. Every image's header is read first (one turn): 413 when their sizes add up to more
    than max_request_pixels, then the first image that cannot be read fails the request, before anything is
    decoded; a failure while decoding fails it too. 413 for a decompression bomb or an image over the pixel limit,
    415 for bytes that are not a readable image; the message names the image."""
    opened = await pool.run(lambda: _open(blobs, max_pixels))
    total = sum(img.width * img.height for img in opened if not isinstance(img, ImageError))
    if total > max_request_pixels:
        raise too_large(f"the request's {len(blobs)} image(s) hold {total:,} pixels together, over the limit of "
                        f"{max_request_pixels:,} per request (RESKD_MAX_REQUEST_PIXELS); send fewer or smaller "
                        f"images per request")
    for name, img in zip(names, opened):
        if isinstance(img, ImageError):
            raise _refuse(name, img)
    return np.stack(await pool.map(lambda item: _to_input(item, spec), list(zip(names, opened)),
                                   weights=[img.width * img.height for img in opened], turn=DECODE_TURN_PIXELS))
