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

Under load a version with a ladder of operating points runs new requests at a cheaper point before it refuses any
(service/serving/degrade.py): the controller is consulted at every admission, and a request that left its exit
settings to the server runs at the controller's current point. A request may carry a deadline: samples still
waiting for a later stage when it passes are answered from the running logits they have (exit reason
`deadline`); a request with samples that reached no stage by then fails with DeadlineExceeded (-> 504). Under
"stage" the queues are checked as the deadline passes; under "request" and "none" between the stages of a batch.
A stage that is running is never interrupted.

The scheduler only queues and dispatches. What a stage's output means for each sample (running logits, confidence,
exit) is reskd.cascade's, the same code the runtime runs; what is measured goes to a SchedulerObserver (the
server's is its ModelMetrics). A batch that fails fails its requests with InferenceFailed, whatever the cause.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np

from reskd.cascade import DEADLINE, CascadeResult, CascadeSamples, advance
from reskd.engine import Engine, Part, images_part
from reskd.runtime import CascadeRuntime

from .audit import Auditor
from .degrade import HOST, Controller, Point


log = logging.getLogger("reskd.service")

Policy = Literal["stage", "request", "none"]


class QueueFull(Exception):
    """A queue is at its bound; the client should retry later."""


class NeverFits(Exception):
    """A request holds more images than the queue can ever take: retrying cannot help (-> 413)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before some of its samples ran any stage (-> 504)."""


class InferenceFailed(Exception):
    """A stage batch failed on the server's side (the cause is logged); its requests fail with this."""


class SchedulerObserver(Protocol):
    """What the scheduler measures, as it happens (the server's is reskd.service.serving.metrics.ModelMetrics)."""

    def queue_depth(self, stage: int, images: int) -> None: ...

    def waited(self, stage: int, seconds: float) -> None: ...

    def stage_ran(self, stage: int, samples: int, seconds: float, padding_rows: int) -> None: ...

    def answered(self, result: CascadeResult) -> None: ...

    def dropped(self, images: int) -> None: ...


class Unobserved:
    def queue_depth(self, stage: int, images: int) -> None:
        pass

    def waited(self, stage: int, seconds: float) -> None:
        pass

    def stage_ran(self, stage: int, samples: int, seconds: float, padding_rows: int) -> None:
        pass

    def answered(self, result: CascadeResult) -> None:
        pass

    def dropped(self, images: int) -> None:
        pass


class Request:
    """One client request: its images, its samples' exit settings and state, and how many are still running;
    the operating point it runs at (None: exit settings of the client's own), its cost in top-point images
    (`work`) and its deadline (perf_counter time, or None)."""

    def __init__(self, images: np.ndarray, samples: CascadeSamples, future: asyncio.Future,
                 point: Point | None = None, work: float | None = None, timeout_s: float | None = None):
        self.images = images
        self.samples = samples
        self.remaining = len(images)
        self.future = future
        self.point = point
        self.point_id: str | None = point.id if point is not None else None
        self.work = float(len(images)) if work is None else work
        self.timeout_s = timeout_s or None
        self.deadline = time.perf_counter() + timeout_s if timeout_s else None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def abandoned(self) -> bool:  # answered already (failed) or the client went away
        return self.future.done()


class Workload:
    """What a model version has admitted and not yet answered, and the rate it answers images at while it has any:
    a newcomer's expected wait is the images ahead of it over that rate. The rate is measured on a busy clock (time
    with at least one request in the system), over the last WINDOW answers, so an idle spell does not make the
    server look slow and a burst after it is not refused for nothing. Images are counted as *work*: each weighted
    by its operating point's cost relative to the version's top point (1 without degrading), so the rate and the
    wait stay right while the point changes."""

    WINDOW = 32

    def __init__(self, clock: Callable[[], float] = time.perf_counter, saturated_at: int = 0) -> None:
        self.clock = clock
        self.requests = 0
        self.images = 0.0  # admitted requests not yet read count as the mean request size
        self.busy = _Clock(clock)  # time with at least one request in the system
        # time with at least `saturated_at` requests in the system (every decoding and inference worker busy): the
        # rate then is what the version can carry (the degrade controller's capacity)
        self.saturated_at = saturated_at
        self.saturated = _Clock(clock)

    def enter(self, images: float) -> None:
        self.requests += 1
        if self.requests == 1:
            self.busy.start()
        if self.requests == self.saturated_at:
            self.saturated.start()
        self.images += images

    def resize(self, before: float, after: float) -> None:
        self.images += after - before

    def leave(self, images: float, answered: float) -> None:
        if answered:
            self.busy.answered(answered)
            if self.saturated_at and self.requests >= self.saturated_at:
                self.saturated.answered(answered)
        if self.requests == self.saturated_at:
            self.saturated.stop()
        self.requests -= 1
        self.images -= images
        if self.requests == 0:
            self.busy.stop()
            self.images = 0.0

    def rate(self) -> float | None:
        """Images answered per busy second, once a few answers are in."""
        return self.busy.rate(self.WINDOW)

    def capacity(self) -> float | None:
        """Images answered per second while every worker was busy, once a few such answers are in (else None)."""
        return self.saturated.rate(self.WINDOW) if self.saturated_at else None

    def expected_wait(self) -> float | None:
        rate = self.rate()
        return self.images / rate if rate else None


class _Clock:
    """A clock that runs only between start() and stop(), and the answers given while it ran: a rate over the
    last `window` answers on it."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._since: float | None = None
        self._before = 0.0
        self._answers: collections.deque[tuple[float, float]] = collections.deque()
        self._answered = 0.0

    def now(self) -> float:
        return self._before + (self.clock() - self._since if self._since is not None else 0.0)

    def start(self) -> None:
        if self._since is None:
            self._since = self.clock()

    def stop(self) -> None:
        if self._since is not None:
            self._before, self._since = self.now(), None

    def answered(self, amount: float, window: int = Workload.WINDOW) -> None:
        if len(self._answers) == window:
            self._answered -= self._answers.popleft()[1]
        self._answers.append((self.now(), amount))
        self._answered += amount

    def rate(self, window: int) -> float | None:
        if len(self._answers) < 4:
            return None
        span = self._answers[-1][0] - self._answers[0][0]
        return (self._answered - self._answers[0][1]) / span if span > 0 else None


class Admission:
    """One admitted request, from before its body is read until it is submitted (CascadeScheduler.admit): it
    reserves room in the queue and counts in the workload as a mean-sized request at the current point. A context
    manager: leaving it without submitting gives the reservation up. `start`: when it was admitted (a deadline
    counts from here)."""

    def __init__(self, scheduler: CascadeScheduler):
        self.scheduler = scheduler
        self.start = time.perf_counter()
        self.images = scheduler.mean_request_images * scheduler.weight()
        scheduler.pending += 1
        scheduler.workload.enter(self.images)
        self.held = True

    def hand_over(self, images: int) -> None:
        """Submitted: the request's real size replaces the estimate; it leaves the workload when answered."""
        self.held = False
        self.scheduler.pending -= 1
        self.scheduler.workload.resize(self.images, images)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.held = False
            self.scheduler.pending -= 1
            self.scheduler.workload.leave(self.images, 0)


@dataclass
class Rows:
    """Some samples of one request waiting at a stage; `where` says where they find what the stage reads (their
    images, and outputs of earlier stages carried for them: the engine's blocks and their rows in each), once
    stage 0 has uploaded their images."""
    request: Request
    rows: np.ndarray
    where: Part | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.rows)

    def _part(self, pick) -> Part | None:
        return None if self.where is None else {src: (block, rows[pick]) for src, (block, rows) in self.where.items()}

    def split(self, k: int) -> tuple[Rows, Rows]:
        head = Rows(self.request, self.rows[:k], self._part(slice(None, k)), self.enqueued)
        tail = Rows(self.request, self.rows[k:], self._part(slice(k, None)), self.enqueued)
        return head, tail


class StageQueue:
    def __init__(self, stage: int, max_batch: int, max_delay_s: float, bound: int, reads: tuple[str, ...] = ()):
        self.stage = stage
        self.reads = reads  # the sources the stage reads: a batch gathers from at most max_blocks blocks of each
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

    def ready(self, now: float, idle: bool = False) -> bool:
        return bool(self.items) and (idle or self.size >= self.max_batch or now >= self.deadline())

    def take(self, *, whole_requests: bool, one_request: bool, max_blocks: int) -> list[Rows]:
        batch: list[Rows] = []
        size = 0
        blocks: dict[str, set[int]] = {src: set() for src in self.reads}
        while self.items and size < self.max_batch:
            rows = self.items[0]
            if rows.request.abandoned:
                self.items.popleft()
                self.size -= len(rows)
                continue
            if batch and (one_request or (whole_requests and size + len(rows) > self.max_batch)):
                break
            new = {} if rows.where is None else {src: id(rows.where[src][0]) for src in self.reads}
            if any(b not in blocks[src] and len(blocks[src]) >= max_blocks for src, b in new.items()):
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
            for src, b in new.items():
                blocks[src].add(b)
        return batch


class CascadeScheduler:
    CONTROL_PERIOD_S = 0.25  # a degraded version's controller looks again at least this often, requests or not
    # _pick's idle rule: requests come concurrently when recent stage-0 batches held this many on average (a moving
    # average over about 1 / TOGETHER_WEIGHT batches)
    CONCURRENT = 1.25
    TOGETHER_WEIGHT = 0.1
    CONTROL_MIN_S = 0.01  # and at most this often (it is consulted at admission: thousands of requests a second)
    def __init__(self, runtime: CascadeRuntime, runner: Engine, executor: Executor, *, model: str,
                 version: int, policy: Policy, max_batch_sizes: list[int], max_queue_delays_s: list[float],
                 max_queue_images: int, pipeline_depth: int, max_wait_s: float = 0.0, min_admitted: int = 0,
                 observer: SchedulerObserver | None = None, controller: Controller | None = None,
                 cost_clock: Literal["thread", "cores", "device"] = "device", cores: int = 1,
                 auditor: Auditor | None = None, audit_executor: Executor | None = None):
        self.runtime = runtime
        self.runner = runner
        self.executor = executor
        self.observer = observer or Unobserved()
        self.model, self.version = model, version
        self.policy = policy

        def per_stage(values: list, s: int):
            return values[min(s, len(values) - 1)]

        stages = runtime.num_stages if policy == "stage" else 1
        self.queues = [StageQueue(s, per_stage(max_batch_sizes, s), per_stage(max_queue_delays_s, s),
                                  max(max_queue_images, per_stage(max_batch_sizes, s)),
                                  tuple(src for _, src in runtime.plan.stages[s].inputs)) for s in range(stages)]
        if policy == "none":
            self.queues[0].max_delay_s = 0.0
        self.pipeline_depth = pipeline_depth
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._in_flight = 0  # batches dispatched and not finished
        # Whether requests come concurrently: when the last batch ended, and the requests per stage-0 batch lately
        # (moving average; 1 = one at a time). _pick's idle rule reads them.
        self._ended = float("-inf")
        self._together = 1.0
        # Admission: requests admitted and not yet submitted (their bodies are being read and decoded), and the
        # mean images per request (an exponential average), to reserve room for them before their size is known.
        self.pending = 0
        self.mean_request_images = 1.0
        self.workload = Workload(saturated_at=max(min_admitted, 1))
        self.max_wait_s = max_wait_s
        self.min_admitted = min_admitted
        self.closed: str | None = None  # why the scheduler stopped (stop()): it admits nothing after
        # Degrading under load (service/serving/degrade.py): None runs every request as asked (shed-only).
        self.controller = controller
        # How a stage's cost is measured (for the controller): "thread", the inference thread's CPU time (a CPU
        # whose onnxruntime runs on the calling thread); "cores", wall time x `cores` (a CPU pool of that many
        # threads); "device", wall time (a GPU: not the host's CPU).
        self.cost_clock, self.cores = cost_clock, cores
        self._deadlines: list[tuple[float, int, Request]] = []  # a heap of the queued requests' deadlines
        self._controlled = 0.0  # when the controller last chose (a degraded version is looked at while idle too)
        # The shadow audit (service/serving/audit.py): answered requests are offered to it; its batches run on their
        # own thread (audit_executor), one at a time, only when nothing of this version is queued or being read.
        self.auditor = auditor
        self.audit_executor = audit_executor or executor

    def _stopped(self) -> QueueFull:
        """What a request gets from a stopped scheduler (503): which version, and why it stopped."""
        return QueueFull(f"model {self.model} version {self.version} {self.closed or 'stopped'}; retry")

    @property
    def idle(self) -> bool:
        """Nothing admitted and unanswered, no batch running: stopping now fails no request (an unload drains
        until then)."""
        return self.workload.requests == 0 and self.pending == 0 and self._in_flight == 0 and \
            (self.auditor is None or not self.auditor.running)

    # --- admission -------------------------------------------------------------------------------------------
    def _control(self) -> None:
        """Let the degrade controller choose the point new requests run at, from what is measured now."""
        self._controlled = time.perf_counter()
        try:
            self.controller.update(self.workload.rate(), self.workload.expected_wait(), self.workload.capacity())
        except Exception:  # the point stays as it is; requests and dispatch go on
            log.exception("the degrade controller of %s version %d failed", self.model, self.version)

    def weight(self, point: Point | None = None) -> float:
        """What an image costs at `point` (default: the controller's current one), in top-point images."""
        c = self.controller
        if c is None:
            return 1.0
        return c.weights[c.rungs.index(point) if point is not None else c.current]

    def admit(self) -> Admission:
        """Admission before any work: called before the request's body is read. Raises QueueFull when stage 0's
        queue, with the room reserved for requests admitted before this one, is full, or when the workload ahead
        would take longer than max_wait_s — unless fewer than min_admitted requests are in the system (the server's
        decoding and inference workers: with fewer, some would idle and the rate itself would fall). The Admission
        holds this request's reservation until it is submitted or given up (use it as a context manager). The
        degrade controller sees every request offered here, admitted or not, and chooses its point first."""
        q = self.queues[0]
        if self.closed:
            raise self._stopped()
        if self.controller is not None:
            self.controller.arrivals.add(self.mean_request_images)
            if time.perf_counter() - self._controlled >= self.CONTROL_MIN_S:
                self._control()
        if q.size + self.pending * self.mean_request_images >= q.bound:
            raise QueueFull(f"model {self.model} version {self.version} has {q.size} images queued and "
                            f"{self.pending} request(s) being read (limit {q.bound} images); retry shortly")
        wait = self.workload.expected_wait() if self.max_wait_s and self.workload.requests >= self.min_admitted \
            else None
        if wait is not None and wait > self.max_wait_s:
            raise QueueFull(f"model {self.model} version {self.version} is overloaded: the "
                            f"{self.workload.images:.0f} images queued or being read ahead would take about "
                            f"{1000 * wait:.0f} ms (limit {1000 * self.max_wait_s:g} ms, RESKD_MAX_QUEUE_WAIT_MS); "
                            f"retry shortly")
        return Admission(self)

    def submit(self, images: np.ndarray, threshold: float | None = None, max_stage: int | None = None,
               admission: Admission | None = None, *, point: str | None = None, degrade: bool = True,
               timeout_s: float | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its CascadeResult, or fails with InferenceFailed,
        DeadlineExceeded or (at shutdown) QueueFull. Cancelling the future (the client went away) drops the
        request's samples still queued. Raises NeverFits for more images than the queue's bound, QueueFull at the
        bound, and CascadeInputError for a threshold or max_stage out of range or an unknown operating point
        (`point`, the id of one of the manifest's: the defaults threshold and max_stage override). admission: the
        request's, from admit() (without one, e.g. in-process users, it enters the workload here). A request that
        sets none of threshold, max_stage and point, and does not opt out (degrade=False), runs at the degrade
        controller's current point. timeout_s: the request's deadline, counted from its admission (None or 0:
        none)."""
        q, n = self.queues[0], len(images)
        if n > q.bound:
            raise NeverFits(f"{n} images in one request, more than model {self.model} version {self.version} "
                            f"queues at once ({q.bound}, RESKD_MAX_QUEUE_IMAGES); send at most {q.bound}")
        self.mean_request_images += 0.1 * (n - self.mean_request_images)
        if q.size + n > q.bound:
            raise QueueFull(f"model {self.model} version {self.version} has {q.size} images queued (limit "
                            f"{q.bound}); retry shortly")
        c = self.controller
        asked = threshold is not None or max_stage is not None or point is not None
        rung = None if asked or c is None else c.point if degrade else c.rungs[0]
        serve_at = rung.id if rung is not None and rung is not c.rungs[0] else None
        samples = self.runtime.samples(n, threshold, max_stage, point, serve_at=serve_at)
        custom = threshold is not None or max_stage is not None
        if rung is None and not custom:
            rung = self._point(point or "default")
        point_id = None if custom else rung.id if rung is not None else point or "default"
        work = n * (self.weight(rung) if rung is not None and c is not None and rung in c.rungs else 1.0)
        future = asyncio.get_running_loop().create_future()
        request = Request(images, samples, future, rung, work, timeout_s)
        request.point_id = point_id
        if admission is not None and request.deadline is not None:
            request.deadline = admission.start + timeout_s
        if admission is not None:
            admission.hand_over(work)
        else:
            self.workload.enter(work)
        future.add_done_callback(lambda f: self._done(request, f))
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, id(request), request))
        q.put(Rows(request, np.arange(n)))
        self.observer.queue_depth(0, q.size)
        self._wakeup.set()
        return future

    def _point(self, point_id: str) -> Point | None:
        """The operating point a request asked for by id (a rung of the ladder when it is one), for its response and
        the metrics."""
        c = self.controller
        for rung in c.rungs if c is not None else ():
            if rung.id == point_id or (point_id == "default" and rung is c.rungs[0]):
                return rung
        return Point.of(self.runtime.manifest, point_id)

    def _done(self, request: Request, future: asyncio.Future) -> None:
        answered = not future.cancelled() and future.exception() is None
        self.workload.leave(request.work, request.work if answered else 0)
        if future.cancelled():
            self._drop(request)

    def _drop(self, request: Request) -> None:
        """The request's client went away (its future was cancelled): its samples waiting in a queue leave it now,
        freeing the room for others; batches already running finish without it."""
        for s, q in enumerate(self.queues):
            mine = [rows for rows in q.items if rows.request is request]
            if mine:
                q.items = collections.deque(rows for rows in q.items if rows.request is not request)
                q.size -= sum(map(len, mine))
                self.observer.queue_depth(s, q.size)
        self.observer.dropped(request.remaining)

    # --- dispatch --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.pipeline_depth)
        self._task = asyncio.get_running_loop().create_task(self._dispatch(),
                                                            name=f"scheduler {self.model}/{self.version}")

    async def stop(self, reason: str = "stopped: the server is shutting down") -> None:
        """Stop dispatching; requests still queued fail with QueueFull (503) saying `reason` (what happened to this
        version), and nothing is admitted after."""
        self.closed = reason
        tasks = [t for t in (self._task, *self._running) if t is not None]  # _run answers its batch when cancelled
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for q in self.queues:
            for rows in q.items:
                if not rows.request.abandoned:
                    rows.request.future.set_exception(self._stopped())
            q.items.clear()
            q.size = 0

    def _pick(self, now: float) -> int | None:
        """The deepest ready stage whose next queue has room (back-pressure). An idle scheduler (no batch in flight,
        samples in one queue only) dispatches that queue at once instead of charging a lone request the queue
        delay; under load batches are in flight, so queues fill up and close by size or delay as before.
        New requests (stage 0) are not dispatched at once, though, within a queue delay of the last batch's end
        while recent stage-0 batches held several requests: concurrent requests that arrive one at a time, as gRPC
        calls do (each reaches the loop on its own, where HTTP requests read in one loop turn come together), would
        otherwise run as batches of one or two, each paying a batch's overhead, and take a third less of them
        through. A lone client waiting for each answer before its next request (batches of one) keeps the
        immediate dispatch, and so do survivors (they move on together)."""
        idle = self._in_flight == 0 and sum(1 for q in self.queues if q.items) == 1 and not (
            self.queues[0].items and now - self._ended < self.queues[0].max_delay_s
            and self._together >= self.CONCURRENT)
        for s in range(len(self.queues) - 1, -1, -1):
            q = self.queues[s]
            if not q.ready(now, idle):
                continue
            if s + 1 < len(self.queues) and self.queues[s + 1].size >= self.queues[s + 1].bound:
                continue
            return s
        return None

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while True:
                if self.closed:  # stop(): on Python 3.11 wait_for can swallow the cancel when woken at that moment
                    return
                now = time.perf_counter()
                self._expire(now)
                degraded = self.controller is not None and self.controller.current > 0
                if degraded and now - self._controlled >= self.CONTROL_PERIOD_S:
                    self._control()  # no request may come: it moves back up all the same once the hold is over
                stage = self._pick(now)
                if stage is not None:
                    break
                self._start_audit()
                waiting = [q.deadline() for q in self.queues if q.items]
                if self._deadlines:
                    waiting.append(self._deadlines[0][0])
                if degraded:
                    waiting.append(self._controlled + self.CONTROL_PERIOD_S)
                if self.auditor is not None and self.auditor.pending:
                    waiting.append(self.auditor.pending[0].queued + self.auditor.STALE_S)
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(min(waiting) - now, 0) if waiting else None)
                except TimeoutError:
                    pass
            q = self.queues[stage]
            batch = q.take(whole_requests=self.policy != "stage", one_request=self.policy == "none",
                           max_blocks=self.runner.max_blocks)
            if stage == 0 and batch:
                self._together += self.TOGETHER_WEIGHT * (len(batch) - self._together)
            self.observer.queue_depth(stage, q.size)
            if not batch:
                self._slots.release()
                continue
            for rows in batch:
                self.observer.waited(stage, now - rows.enqueued)
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(stage, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _start_audit(self) -> None:
        """Spare capacity (nothing of this version queued or being read, and the dispatcher holds a free slot): run
        the next audit batch, if one waits and none is running."""
        a = self.auditor
        if a is None or not a.pending:
            return
        a.expire()
        if not a.ready or self.pending or any(q.items for q in self.queues):
            return
        taken = a.take()
        if taken is None:
            return
        task = asyncio.get_running_loop().create_task(self._audit(*taken))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _audit(self, batch, audit) -> None:
        classes = None
        try:
            classes = await asyncio.get_running_loop().run_in_executor(self.audit_executor, Auditor.run, batch, audit)
        except asyncio.CancelledError:  # stop(): nothing to count
            self.auditor.running = False
            raise
        except Exception:
            log.exception("the audit of %s version %d against %s failed (%d images)", self.model, self.version,
                          self.auditor.reference.describe(), sum(map(len, batch)))
        self.auditor.record(batch, classes)
        self._wakeup.set()

    def _expire(self, now: float) -> None:
        """Requests whose deadline has passed: their samples waiting at a later stage are answered from the running
        logits they have; a request with samples that have not run stage 0 fails (DeadlineExceeded)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            if request.abandoned:
                continue
            waiting = [(s, rows) for s, q in enumerate(self.queues) for rows in q.items if rows.request is request]
            for s, rows in waiting:
                q = self.queues[s]
                q.items.remove(rows)
                q.size -= len(rows)
                self.observer.queue_depth(s, q.size)
            if any(s == 0 for s, _ in waiting):  # (samples in a running batch are settled when it ends)
                ran = len(request.images) - sum(len(rows) for s, rows in waiting if s == 0)
                request.future.set_exception(DeadlineExceeded(
                    f"the request's deadline ({1000 * request.timeout_s:g} ms after it was admitted) passed with "
                    f"{len(request.images) - ran} of its {len(request.images)} images not yet run by any stage of "
                    f"{self.model} version {self.version}; raise the timeout or retry when the server is less busy"))
                continue
            for s, rows in waiting:
                self._settle(rows, s - 1)
            self._finish_if_done(request)

    def _settle(self, rows: Rows, stage: int) -> None:
        """Answer these samples (past their deadline) from their running logits after `stage` (on the loop)."""
        rows.request.samples.settle(rows.rows, stage, DEADLINE)
        rows.request.remaining -= len(rows)

    async def _run(self, stage: int, batch: list[Rows]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.policy == "stage":
                survivors, exited = await loop.run_in_executor(self.executor, self._step, stage, batch)
            else:
                survivors, exited = await loop.run_in_executor(self.executor, self._chain, batch)
        except asyncio.CancelledError:  # stop(): this batch's requests are answered, not left waiting forever
            for rows in batch:
                if not rows.request.abandoned:
                    rows.request.future.set_exception(self._stopped())
            raise
        except Exception as err:  # only this batch's requests fail; the scheduler and other requests go on
            failure = err if isinstance(err, InferenceFailed) else InferenceFailed(
                f"inference failed on a batch of {self.model} version {self.version} ({type(err).__name__}); the "
                "server logged the details")
            log.exception("%s (%d samples)", failure, sum(map(len, batch)))
            for rows in batch:
                if not rows.request.abandoned:
                    rows.request.future.set_exception(failure)
            return
        finally:
            self._in_flight -= 1
            self._ended = time.perf_counter()
            self._slots.release()
            self._wakeup.set()
        for req, count in exited:  # counted here, on the loop, as batches in flight may share a request
            req.remaining -= count
        now = time.perf_counter()
        if survivors:
            q = self.queues[stage + 1]
            for rows in survivors:
                if rows.request.expired(now):
                    self._settle(rows, stage)
                elif not rows.request.abandoned:
                    q.put(rows)
            self.observer.queue_depth(stage + 1, q.size)
        for rows in batch:
            self._finish_if_done(rows.request)

    # --- work in the inference thread ------------------------------------------------------------------------
    def _chain(self, batch: list[Rows]) -> tuple[list[Rows], list[tuple[Request, int]]]:
        """Request-level policies: the batch goes through the stages on its own, holding the engine from stage 0
        to its last, so its images go to the engine's staging buffer and every gather can be a captured graph
        (the runtime's own path)."""
        stage, exited = 0, []
        with self.runner.lock:
            while batch:
                batch, out = self._step(stage, batch, staged=True)
                exited += out
                now, going = time.perf_counter(), []
                for rows in batch:  # past its deadline: answered with what it has after this stage
                    if rows.request.expired(now):
                        rows.request.samples.settle(rows.rows, stage, DEADLINE)
                        exited.append((rows.request, len(rows)))
                    else:
                        going.append(rows)
                batch = going
                stage += 1
        return [], exited

    def _step(self, stage: int, batch: list[Rows],
              staged: bool = False) -> tuple[list[Rows], list[tuple[Request, int]]]:
        """Run one stage on the batch and advance its samples (reskd.cascade records their state and exits).
        staged: stage 0's images go to the engine's staging buffer (valid while the caller holds the engine).
        -> (survivors, (request, samples that exited) pairs). Raises InferenceFailed, caused by what failed."""
        try:
            return self._try_step(stage, batch, staged)
        except Exception as err:
            raise InferenceFailed(f"inference failed at stage {stage} of {self.model} version {self.version} "
                                  f"({type(err).__name__}); the server logged the details") from err

    def _try_step(self, stage: int, batch: list[Rows],
                  staged: bool) -> tuple[list[Rows], list[tuple[Request, int]]]:
        if stage == 0:
            images = np.concatenate([r.request.images[r.rows] for r in batch]) if len(batch) > 1 else \
                batch[0].request.images[batch[0].rows]
            block = self.runner.stage_block(images) if staged else self.runner.upload(images)
            offset = 0
            for r in batch:
                r.where = images_part(block, np.arange(offset, offset + len(r)))
                offset += len(r)
        start, cpu = time.perf_counter(), time.thread_time()
        run = self.runner.run(stage, [r.where for r in batch], keep=not staged)
        seconds = time.perf_counter() - start
        self.observer.stage_ran(stage, len(run.logits), seconds, run.padding)
        if self.controller is not None:  # what a sample of this stage costs (service/serving/degrade.py)
            spent = time.thread_time() - cpu if self.cost_clock == "thread" else \
                seconds * self.cores if self.cost_clock == "cores" else seconds
            self.controller.stages.ran(stage, len(run.logits), spent)
            if self.cost_clock != "device":
                HOST.stage_seconds += spent
        leaves = advance(self.runtime.rule, stage, [(r.request.samples, r.rows) for r in batch], run.logits)
        survivors, exited = [], []
        now, offset = time.perf_counter(), 0
        for r, leave in zip(batch, leaves):
            exited.append((r.request, int(leave.sum())))
            if not leave.all():
                keep = ~leave
                # the carried outputs' rows are the batch's order: this part's are offset..offset+len(r)
                carried = {src: (block, offset + np.arange(len(r))) for src, block in run.carried.items()}
                where = self.runtime.survivors(stage, {**r.where, **carried}, {}, keep)
                survivors.append(Rows(r.request, r.rows[keep], where, now))
            offset += len(r)
        return survivors, exited

    def _finish_if_done(self, req: Request) -> None:
        if req.remaining or req.abandoned:
            return
        result = req.samples.result(self.runtime.cum_flops)
        result.point, result.point_figures = req.point_id, req.point
        req.future.set_result(result)
        HOST.images += len(result)
        self.observer.answered(result)
        if self.auditor is not None:  # after the answer: the audit never delays it
            self.auditor.offer(req.images, result, req.point_id)
            if self.auditor.ready:
                self._wakeup.set()
