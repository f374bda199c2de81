"""Dynamic batching across requests, one queue per served model version.

Requests wait in a bounded queue; a batch closes when it holds max_batch_size images or max_queue_delay after the
first request arrived, then the whole cascade runs on it in the inference executor (never on the event loop), and
each request gets its own rows back. Requests in one batch may carry different thresholds and max_stage: the
runtime takes them per sample. When the queue holds max_queue_images, admission refuses (QueueFull -> 503 with
Retry-After) instead of letting memory grow.

This is request-level batching (Triton's way); the per-stage scheduler slots in behind the same `submit`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from reskd.runtime import CascadeResult, CascadeRuntime

from .metrics import Metrics

log = logging.getLogger("reskd.service")


class QueueFull(Exception):
    """The model's queue is at its bound; the client should retry later."""


@dataclass
class Job:
    images: np.ndarray  # float32 [n, C, H, W]
    threshold: float | None
    max_stage: int | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.images)


def _slice(result: CascadeResult, start: int, stop: int) -> CascadeResult:
    return CascadeResult(result.logits[start:stop], result.class_id[start:stop], result.confidence[start:stop],
                         result.exit_stage[start:stop], result.flops[start:stop])


class RequestBatcher:
    def __init__(self, runtime: CascadeRuntime, executor: Executor, metrics: Metrics, *, model: str, version: int,
                 max_batch_size: int, max_queue_delay_s: float, max_queue_images: int, teacher_flops: int):
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.model, self.version = model, version
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_images = max_queue_images
        self.teacher_flops = teacher_flops
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_images = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._depth = metrics.queue_depth.labels(model, str(version), "0")
        self._waited = metrics.queue_duration.labels(model, str(version), "0")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.model}/{self.version}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(QueueFull("the server is shutting down"))
        self._queue.clear()

    def submit(self, images: np.ndarray, threshold: float | None = None,
               max_stage: int | None = None) -> asyncio.Future:
        """Queue one request's images; the future resolves to its CascadeResult. Raises QueueFull at the bound."""
        if self._queued_images + len(images) > self.max_queue_images:
            raise QueueFull(f"model {self.model} version {self.version} has {self._queued_images} images queued "
                            f"(limit {self.max_queue_images}); retry shortly")
        job = Job(images, threshold, max_stage, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += len(job)
        self._depth.set(self._queued_images)
        self._arrived.set()
        return job.future

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].enqueued + self.max_queue_delay_s
            while self._queued_images < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            jobs = self._take()
            if jobs:
                await self._run(jobs)

    def _take(self) -> list[Job]:
        """Whole requests, oldest first, up to max_batch_size images (a larger single request runs alone)."""
        jobs, size = [], 0
        while self._queue and (not jobs or size + len(self._queue[0]) <= self.max_batch_size):
            job = self._queue.popleft()
            self._queued_images -= len(job)
            if job.future.done():  # the client went away while it waited
                continue
            jobs.append(job)
            size += len(job)
        self._depth.set(self._queued_images)
        return jobs

    async def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            self._waited.observe(now - job.enqueued)
        images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
        uniform = all(j.threshold == jobs[0].threshold and j.max_stage == jobs[0].max_stage for j in jobs)
        if uniform:
            threshold, max_stage = jobs[0].threshold, jobs[0].max_stage
        else:
            threshold = [j.threshold for j in jobs for _ in range(len(j))]
            max_stage = [j.max_stage for j in jobs for _ in range(len(j))]
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.executor, self._infer, images, threshold, max_stage)
        except Exception as err:  # only this batch fails; the loop and other requests go on
            log.exception("inference failed for a batch of %d images of %s/%s", len(images), self.model,
                          self.version)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.metrics.record_results(self.model, self.version, result.exit_stage, result.flops, self.teacher_flops,
                                    int(self.runtime.cum_flops[-1]))
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(_slice(result, start, start + len(job)))
            start += len(job)

    def _infer(self, images, threshold, max_stage) -> CascadeResult:
        def on_stage(stage: int, samples: int, seconds: float) -> None:
            self.metrics.record_stage(self.model, self.version, stage, samples, seconds)

        return self.runtime.run(images, threshold=threshold, max_stage=max_stage, on_stage=on_stage)
