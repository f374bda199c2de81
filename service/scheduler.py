"""Scheduling a model version's requests through its stages. One class, three policies (RESKD_SCHEDULER):

- "stage" (default): per-stage re-batching. Each stage has its own queue, max batch size and max delay. After a
  stage, samples that exit are done at once; survivors join the next stage's queue and are merged there with the
  survivors of other batches, so a stage-1 batch holds samples of several requests and stays large even when
  most samples leave after stage 0. A request's images may exit at different stages; its answer waits for all.
- "request": request-level dynamic batching (Triton's way): requests are batched at admission and each batch
  runs through every stage on its own, shrinking as samples exit.
- "none": every request runs alone.

The dispatcher (one asyncio task) runs the deepest stage whose queue is ready (full, or its oldest sample has
waited max delay), so older samples finish first and later-stage batches fill up while stage 0 runs. At most
`pipeline_depth` batches are in flight, in the inference thread pool; with one thread on a CPU the stages take
turns on the whole thread budget. Queues are bounded: stage s stops being dispatched while stage s+1's queue is
full, so pressure travels back to admission, which refuses with QueueFull (-> 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from reskd.exit_policy import confidence
from reskd.runtime import CascadeResult, CascadeRuntime

from .metrics import Metrics
from .stages import StageRunner

log = logging.getLogger("reskd.service")

Policy = Literal["stage", "request", "none"]


class QueueFull(Exception):
    """A queue is at its bound; the client should retry later."""


class Request:
    """One client request's images and the state of each of its samples."""

    def __init__(self, images: np.ndarray, thresholds: np.ndarray, last: np.ndarray, classes: int,
                 future: asyncio.Future):
        n = len(images)
        self.images = images
        self.thresholds = thresholds  # [n, stages - 1]
        self.last = last  # [n]: max_stage per sample
        self.running = np.zeros((n, classes), np.float64)  # summed in float64, as the runtime and calibration do
        self.conf = np.zeros(n, np.float64)
        self.exit_stage = np.zeros(n, np.int32)
        self.remaining = n
        self.future = future

    @property
    def abandoned(self) -> bool:  # answered already (failed) or the client went away
        return self.future.done()


@dataclass
class Rows:
    """Some samples of one request waiting at a stage; block/block_rows say where their images are."""
    request: Request
    rows: np.ndarray
    block: Any = None
    block_rows: np.ndarray | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, k: int) -> tuple[Rows, Rows]:
        head = Rows(self.request, self.rows[:k], self.block,
                    None if self.block_rows is None else self.block_rows[:k], self.enqueued)
        tail = Rows(self.request, self.rows[k:], self.block,
                    None if self.block_rows is None else self.block_rows[k:], self.enqueued)
        return head, tail


class StageQueue:
    def __init__(self, stage: int, max_batch: int, max_delay_s: float, bound: int):
        self.stage = stage
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.bound = bound
        self.items: collections.deque[Rows] = collections.deque()
        self.size = 0

    def put(self, rows: Rows) -> None:
        self.items.append(rows)
        self.size += len(rows)

    def deadline(self) -> float:
        return self.items[0].enqueued + self.max_delay_s

    def ready(self, now: float) -> bool:
        return bool(self.items) and (self.size >= self.max_batch or now >= self.deadline())

    def take(self, *, whole_requests: bool, one_request: bool, max_blocks: int) -> list[Rows]:
        batch: list[Rows] = []
        size, blocks = 0, set()
        while self.items and size < self.max_batch:
            rows = self.items[0]
            if rows.request.abandoned:
                self.items.popleft()
                self.size -= len(rows)
                continue
            if batch and (one_request or (whole_requests and size + len(rows) > self.max_batch)):
                break
            if rows.block is not None and id(rows.block) not in blocks and len(blocks) >= max_blocks:
                break
            if not whole_requests and size + len(rows) > self.max_batch:
                rows, rest = rows.split(self.max_batch - size)
                self.items[0] = rest
                self.size -= len(rows)
            else:
                self.items.popleft()
                self.size -= len(rows)
            batch.append(rows)
            size += len(rows)
            if rows.block is not None:
                blocks.add(id(rows.block))
        return batch


class CascadeScheduler:
    def __init__(self, runtime: CascadeRuntime, runner: StageRunner, executor: Executor, metrics: Metrics, *,
                 model: str, version: int, policy: Policy, max_batch_sizes: list[int],
                 max_queue_delays_s: list[float], max_queue_images: int, pipeline_depth: int):
        self.runtime = runtime
        self.runner = runner
        self.executor = executor
        self.metrics = metrics
        self.model, self.version = model, version
        self.policy = policy
        self.num_stages = runtime.num_stages
        self.teacher_flops = runtime.manifest.teacher.flops
        self.measure = runtime.manifest.exit.measure
        self.classes = runtime.num_classes

        def per_stage(values: list, s: int):
            return values[min(s, len(values) - 1)]

        stages = self.num_stages if policy == "stage" else 1
        self.queues = [StageQueue(s, per_stage(max_batch_sizes, s), per_stage(max_queue_delays_s, s),
                                  max(max_queue_images, per_stage(max_batch_sizes, s))) for s in range(stages)]
        if policy == "none":
            self.queues[0].max_delay_s = 0.0
        self.pipeline_depth = pipeline_depth
        v = str(version)
        self._depth = [metrics.queue_depth.labels(model, v, str(s)) for s in range(self.num_stages)]
        self._waited = [metrics.queue_duration.labels(model, v, str(s)) for s in range(self.num_stages)]
        self._padding = [metrics.padding_flops.labels(model, v, str(s)) for s in range(self.num_stages)]
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    # --- admission -------------------------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return sum(q.size for q in self.queues)

    def submit(self, images: np.ndarray, threshold: float | None = None,
               max_stage: int | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its CascadeResult. Raises QueueFull at the bound, and
        ValueError for a threshold or max_stage out of range."""
        q = self.queues[0]
        if q.size + len(images) > q.bound:
            raise QueueFull(f"model {self.model} version {self.version} has {q.size} images queued (limit "
                            f"{q.bound}); retry shortly")
        n = len(images)
        thresholds = np.broadcast_to(self.runtime.thresholds_for(threshold), (n, self.num_stages - 1))
        last = np.full(n, self.runtime.check_max_stage(max_stage), np.int32)
        future = asyncio.get_running_loop().create_future()
        request = Request(images, thresholds, last, self.classes, future)
        q.put(Rows(request, np.arange(n)))
        self._depth[0].set(q.size)
        self._wakeup.set()
        return future

    # --- dispatch --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.pipeline_depth)
        self._task = asyncio.get_running_loop().create_task(self._dispatch(),
                                                            name=f"scheduler {self.model}/{self.version}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for q in self.queues:
            for rows in q.items:
                if not rows.request.abandoned:
                    rows.request.future.set_exception(QueueFull("the server is shutting down"))
            q.items.clear()
            q.size = 0

    def _pick(self, now: float) -> int | None:
        """The deepest ready stage whose next queue has room (back-pressure)."""
        for s in range(len(self.queues) - 1, -1, -1):
            q = self.queues[s]
            if not q.ready(now):
                continue
            if s + 1 < len(self.queues) and self.queues[s + 1].size >= self.queues[s + 1].bound:
                continue
            return s
        return None

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while True:
                now = time.perf_counter()
                stage = self._pick(now)
                if stage is not None:
                    break
                waiting = [q.deadline() for q in self.queues if q.items]
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(min(waiting) - now, 0) if waiting else None)
                except TimeoutError:
                    pass
            q = self.queues[stage]
            batch = q.take(whole_requests=self.policy != "stage", one_request=self.policy == "none",
                           max_blocks=self.runner.max_blocks)
            self._depth[stage].set(q.size)
            if not batch:
                self._slots.release()
                continue
            for rows in batch:
                self._waited[stage].observe(now - rows.enqueued)
            task = asyncio.get_running_loop().create_task(self._run(stage, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, stage: int, batch: list[Rows]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.policy == "stage":
                survivors, exited = await loop.run_in_executor(self.executor, self._step, stage, batch)
            else:
                survivors, exited = await loop.run_in_executor(self.executor, self._chain, batch)
        except Exception as err:  # only this batch's requests fail; the scheduler and other requests go on
            log.exception("stage %d failed on a batch of %d samples of %s/%s", stage, sum(map(len, batch)),
                          self.model, self.version)
            for rows in batch:
                if not rows.request.abandoned:
                    rows.request.future.set_exception(err)
            return
        finally:
            self._slots.release()
            self._wakeup.set()
        for req, count in exited:  # counted here, on the loop, as batches in flight may share a request
            req.remaining -= count
        for rows in batch:
            self._finish_if_done(rows.request)
        if survivors:
            q = self.queues[stage + 1]
            for rows in survivors:
                q.put(rows)
            self._depth[stage + 1].set(q.size)

    # --- work in the inference thread ------------------------------------------------------------------------
    def _chain(self, batch: list[Rows]) -> tuple[list[Rows], list[tuple[Request, int]]]:
        """Request-level policies: the batch goes through the stages on its own."""
        stage, exited = 0, []
        while batch:
            batch, out = self._step(stage, batch)
            exited += out
            stage += 1
        return [], exited

    def _step(self, stage: int, batch: list[Rows]) -> tuple[list[Rows], list[tuple[Request, int]]]:
        """Run one stage on the batch; record each sample's logits, confidence and exit in its request.
        -> (survivors, (request, samples that exited) pairs)."""
        if stage == 0:
            images = np.concatenate([r.request.images[r.rows] for r in batch]) if len(batch) > 1 else \
                batch[0].request.images[batch[0].rows]
            block = self.runner.upload(images)
            offset = 0
            for r in batch:
                r.block, r.block_rows = block, np.arange(offset, offset + len(r))
                offset += len(r)
        start = time.perf_counter()
        logits, padding = self.runner.run(stage, [(r.block, r.block_rows) for r in batch])
        seconds = time.perf_counter() - start
        n = len(logits)
        self.metrics.record_stage(self.model, self.version, stage, n, seconds)
        if padding:
            self._padding[stage].inc(padding * int(self.runtime.stage_flops[stage]))
        running = np.concatenate([r.request.running[r.rows] for r in batch]) + logits
        conf = confidence(running, self.measure)
        done = np.concatenate([r.request.last[r.rows] for r in batch]) == stage
        if stage < self.num_stages - 1:
            done |= conf >= np.concatenate([r.request.thresholds[r.rows, stage] for r in batch])
        survivors, exited, offset = [], [], 0
        now = time.perf_counter()
        for r in batch:
            sl = slice(offset, offset + len(r))
            offset += len(r)
            req = r.request
            req.running[r.rows] = running[sl]
            req.conf[r.rows] = conf[sl]
            leave = done[sl]
            req.exit_stage[r.rows[leave]] = stage
            exited.append((req, int(leave.sum())))
            if not leave.all():
                keep = ~leave
                survivors.append(Rows(req, r.rows[keep], r.block, r.block_rows[keep], now))
        return survivors, exited

    def _finish_if_done(self, req: Request) -> None:
        if req.remaining or req.abandoned:
            return
        flops = self.runtime.cum_flops[req.exit_stage].astype(np.int64)
        req.future.set_result(CascadeResult(req.running.astype(np.float32), req.running.argmax(-1).astype(np.int64),
                                            req.conf, req.exit_stage, flops))
        self.metrics.record_results(self.model, self.version, req.exit_stage, flops, self.teacher_flops,
                                    int(self.runtime.cum_flops[-1]))
