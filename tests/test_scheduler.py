"""The cascade scheduler in process, with the real runtime and onnxruntime sessions: per-stage re-batching merges
survivors of different requests, every policy gives each sample what the runtime alone gives, back-pressure
refuses instead of queueing without bound, and a failing stage fails only its batch."""

from __future__ import annotations

import asyncio
import threading
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np
import pytest

from reskd.cascade import CascadeResult
from reskd.device import Device
from reskd.engine import EngineSpec, HostEngine
from reskd.runtime import CascadeRuntime
from reskd.service.serving.metrics import Metrics
from reskd.service.serving.models import thread_budget
from reskd.service.serving.scheduler import CascadeScheduler, InferenceFailed, QueueFull, Workload
from reskd.service.settings import ServeSettings
from server_process import MODELS


@pytest.fixture(scope="module")
def rt():
    return CascadeRuntime(MODELS / "fashion-mnist" / "1", device=Device.cpu())


class Spy:
    """Passes every call to the real runner and records which requests each stage batch held."""

    def __init__(self, runner, fail_marker: float | None = None):
        self.runner = runner
        self.max_blocks = runner.max_blocks
        self.batches: list[tuple[int, list[int]]] = []
        self.fail_marker = fail_marker
        self.current: list[int] = []

    def upload(self, images):
        return self.runner.upload(images)

    def stage_block(self, images):
        return self.runner.stage_block(images)

    @property
    def lock(self):
        return self.runner.lock

    def run(self, stage, parts, keep=False):
        self.batches.append((stage, list(self.current)))
        return self.runner.run(stage, parts, keep)

    @property
    def plan(self):
        return self.runner.plan

    def warm_up(self, batch_sizes=None):
        self.runner.warm_up(batch_sizes)


def scheduler(rt, runner, policy="stage", batch=(64,), delay_ms=(1,), bound=1024, depth=1, metrics=None,
              max_wait_s=0.0):
    observer = (metrics or Metrics()).for_model("m", 1, rt.manifest)
    return CascadeScheduler(rt, runner, ThreadPoolExecutor(depth), model="m", version=1, policy=policy,
                            max_batch_sizes=list(batch), max_queue_delays_s=[d / 1000 for d in delay_ms],
                            max_queue_images=bound, pipeline_depth=depth, max_wait_s=max_wait_s, observer=observer)


def requests(seed=0, count=24):
    """Random-sized requests of random images with a mix of per-request settings."""
    rng = np.random.default_rng(seed)
    settings = [(None, None), (1.0, None), (0.0, None), (1.0, 1), (None, 0), (0.6, None)]
    return [(rng.normal(size=(int(rng.integers(1, 6)), 1, 28, 28)).astype(np.float32), *settings[i % len(settings)])
            for i in range(count)]


async def serve_all(sched, reqs, stagger_s=0.0):
    sched.start()
    try:
        futures = []
        for images, threshold, max_stage in reqs:
            futures.append(sched.submit(images, threshold, max_stage))
            if stagger_s:
                await asyncio.sleep(stagger_s)
        return await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await sched.stop()


def test_a_later_stage_batch_merges_survivors_of_several_requests(rt):
    spy = Spy(rt.engine)
    ids = {}

    real_step = CascadeScheduler._step

    def step(self, stage, batch):  # note which request each row group belongs to, then run the real step
        spy.current = sorted({ids[id(r.request.images)] for r in batch})
        return real_step(self, stage, batch)

    sched = scheduler(rt, spy, batch=(1, 64, 64), delay_ms=(0, 200, 200))
    sched._step = step.__get__(sched)
    rng = np.random.default_rng(1)
    reqs = [(rng.normal(size=(1, 1, 28, 28)).astype(np.float32), 1.0, None) for _ in range(6)]
    for i, (images, _, _) in enumerate(reqs):
        ids[id(images)] = i
    results = asyncio.run(serve_all(sched, reqs))
    assert all(r.exit_stage[0] == 2 for r in results)
    stage0 = [b for s, b in spy.batches if s == 0]
    stage1 = [b for s, b in spy.batches if s == 1]
    assert all(len(b) == 1 for b in stage0) and len(stage0) == 6  # stage 0 took one request at a time
    assert max(len(b) for b in stage1) >= 2, stage1  # ...and stage 1 merged their survivors
    assert sorted(i for b in stage1 for i in b) == list(range(6))


@pytest.mark.parametrize("policy", ["stage", "request", "none"])
@pytest.mark.parametrize("runner", ["host", "bound"])
def test_every_policy_gives_what_the_runtime_gives(rt, policy, runner):
    reqs = requests()
    if runner == "bound":
        rt = CascadeRuntime(rt.path, device=Device.cpu(), engine=EngineSpec("bound", buckets=(1, 4, 16, 64),
                                                                             max_blocks=3))
    stages = rt.engine
    metrics = Metrics()
    sched = scheduler(rt, stages, policy=policy, batch=(16, 8, 8), delay_ms=(2, 5, 5), depth=2, metrics=metrics)
    results = asyncio.run(serve_all(sched, reqs, stagger_s=0.001))
    for (images, threshold, max_stage), got in zip(reqs, results):
        same_result(got, rt.run(images, threshold=threshold, max_stage=max_stage))
    # The same samples as one runtime batch with per-sample settings: what the scheduler's merged batches hold.
    one_batch = rt.run(np.concatenate([r[0] for r in reqs]),
                       threshold=[t for images, t, _ in reqs for _ in images],
                       max_stage=[m for images, _, m in reqs for _ in images])
    same_result(concat(results), one_batch)
    total = sum(len(r[0]) for r in reqs)
    images = metrics.images.labels("m", "1")._value.get()
    assert images == total  # each sample counted once: no request lost or answered twice
    exits = np.concatenate([r.exit_stage for r in results])
    assert len(set(exits.tolist())) == 3
    padding = sum(metrics.padding_flops.labels("m", "1", str(s))._value.get() for s in range(3))
    assert (padding > 0) == (runner == "bound")  # bucketed batches pad; the host path never does


def same_result(got, want):
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
    np.testing.assert_array_equal(got.class_id, want.class_id)
    np.testing.assert_array_equal(got.flops, want.flops)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-6)


def concat(results):
    arrays = [f.name for f in fields(CascadeResult) if isinstance(getattr(results[0], f.name), np.ndarray)]
    return CascadeResult(**{name: np.concatenate([getattr(r, name) for r in results]) for name in arrays})


def test_back_pressure_refuses_at_admission(rt):
    async def go():
        sched = scheduler(rt, rt.engine, batch=(8,), delay_ms=(10_000,), bound=8)
        sched.start()
        try:
            first = sched.submit(np.zeros((8, 1, 28, 28), np.float32))
            with pytest.raises(QueueFull, match="8 images queued"):
                sched.submit(np.zeros((1, 1, 28, 28), np.float32))
            result = await first  # a full batch is ready at once, whatever the delay
            assert len(result) == 8
            assert len(await sched.submit(np.zeros((3, 1, 28, 28), np.float32), 0.0)) == 3
        finally:
            await sched.stop()

    asyncio.run(go())


def test_the_workload_rate_is_measured_on_a_busy_clock():
    """Images answered per second while the model had work: an idle minute between requests does not count."""
    now = [0.0]
    w = Workload(clock=lambda: now[0])
    for _ in range(5):  # one 100-image request at a time, 0.1 s each, a minute apart
        w.enter(100)
        now[0] += 0.1
        w.leave(100, 100)
        now[0] += 60
    assert w.rate() == pytest.approx(1000)
    w.enter(100)
    w.enter(200)
    assert w.expected_wait() == pytest.approx(0.3)
    w.leave(100, 0)  # failed or abandoned: leaves, answers nothing
    assert w.images == 200 and w.requests == 1


def test_admission_refuses_when_the_expected_wait_is_over_the_limit(rt):
    async def go():
        sched = scheduler(rt, rt.engine, max_wait_s=0.05)
        now = [0.0]
        sched.workload = Workload(clock=lambda: now[0])
        for _ in range(5):  # the model answers 1000 images/s
            sched.workload.enter(100)
            now[0] += 0.1
            sched.workload.leave(100, 100)
        sched.mean_request_images = 20.0
        held = [sched.admit() for _ in range(2)]  # 40 images ahead: 40 ms
        with held[0], held[1]:
            third = sched.admit()  # 40 ms ahead of it: admitted
            with pytest.raises(QueueFull, match="about 60 ms .limit 50 ms, RESKD_MAX_QUEUE_WAIT_MS"):
                sched.admit()
            third.__exit__()
        assert sched.workload.images == 0 and sched.pending == 0
        with sched.admit():  # room again
            pass
        # Below min_admitted requests in the system, the wait does not count: every worker gets work.
        sched.min_admitted = 4
        held = [sched.admit() for _ in range(4)]  # 80 ms ahead of the 4th
        with pytest.raises(QueueFull, match="RESKD_MAX_QUEUE_WAIT_MS"):
            sched.admit()
        for admission in held:
            admission.__exit__()

    asyncio.run(go())


@pytest.mark.parametrize("policy", ["stage", "request"])
def test_an_idle_scheduler_dispatches_a_lone_request_at_once(rt, policy):
    """Nothing in flight and nothing else queued: the request does not wait for its batch to fill or time out
    (a minute here), at any stage; while a batch is in flight, the queue waits as configured."""
    async def go():
        sched = scheduler(rt, rt.engine, policy=policy, batch=(64, 64, 64), delay_ms=(60_000,) * 3)
        sched.start()
        try:
            result = await asyncio.wait_for(sched.submit(np.zeros((2, 1, 28, 28), np.float32), 1.0), 20)
            assert result.exit_stage.tolist() == [2, 2]  # through every stage, each dispatched at once
            sched._in_flight += 1  # as if a batch were running: the next request waits for its delay
            waiting = sched.submit(np.zeros((1, 1, 28, 28), np.float32))
            await asyncio.sleep(0.3)
            assert not waiting.done() and sched.queues[0].size == 1
        finally:
            await sched.stop()

    asyncio.run(go())


def test_requests_arriving_one_by_one_after_concurrent_ones_wait_for_their_batch(rt):
    """A client sending one request at a time gets each dispatched at once; once requests have come several to a
    batch, a lone newcomer within a queue delay of the last batch's end waits for the delay (or a full batch), as
    under load, so calls arriving one by one (gRPC) are batched; its survivors still move on at once."""
    async def go():
        sched = scheduler(rt, rt.engine, batch=(64, 64, 64), delay_ms=(60_000,) * 3)
        sched.start()
        one = np.zeros((1, 1, 28, 28), np.float32)
        try:
            for _ in range(5):  # one at a time, each through every stage at once
                assert (await asyncio.wait_for(sched.submit(one, 1.0), 20)).exit_stage.tolist() == [2]
            # Four together: dispatched at once as one batch (nothing in flight), and then through every stage.
            together = await asyncio.wait_for(asyncio.gather(*(sched.submit(one, 1.0) for _ in range(4))), 20)
            assert [r.exit_stage.tolist() for r in together] == [[2]] * 4
            waiting = sched.submit(one, 1.0)  # right after: held for its batch
            await asyncio.sleep(0.3)
            assert not waiting.done() and sched.queues[0].size == 1
            # A full batch closes at once all the same, the lone request's with it.
            full = sched.submit(np.zeros((63, 1, 28, 28), np.float32), 1.0)
            assert (await asyncio.wait_for(waiting, 20)).exit_stage.tolist() == [2]
            assert (await asyncio.wait_for(full, 20)).exit_stage.tolist() == [2] * 63
        finally:
            await sched.stop()

    asyncio.run(go())


def test_a_full_next_queue_holds_back_the_stage_before_it(rt):
    sched = scheduler(rt, rt.engine, batch=(4, 4, 4), delay_ms=(0, 0, 0), bound=4)
    q0, q1 = sched.queues[0], sched.queues[1]

    async def fill():
        sched._wakeup = asyncio.Event()
        sched.submit(np.zeros((4, 1, 28, 28), np.float32))

    asyncio.run(fill())
    now = q0.items[0].enqueued + 1
    assert sched._pick(now) == 0
    q1.size = q1.bound  # stage 1's queue at its bound...
    q1.items.append(q0.items[0])
    assert sched._pick(now) == 1  # ...is served first, and stage 0 waits for room
    q1.items.clear()
    q1.size = q1.bound
    assert sched._pick(now) is None


MARK = np.float32(7.77)


def test_a_failing_stage_fails_only_its_batch(rt):
    class Failing(HostEngine):
        def run(self, stage, parts, keep=False):
            if stage == 1 and any((block[rows][:, 0, 0, 0] == MARK).any() for block, rows in
                                  (part["images"] for part in parts)):
                raise RuntimeError("stage 1 exploded")
            return super().run(stage, parts, keep)

    rng = np.random.default_rng(2)
    good = [(rng.normal(size=(2, 1, 28, 28)).astype(np.float32), 1.0, None) for _ in range(3)]
    bad = rng.normal(size=(2, 1, 28, 28)).astype(np.float32)
    bad[:, 0, 0, 0] = MARK
    reqs = [good[0], (bad, 1.0, None), good[1], good[2]]
    # Each request alone in its batches: the bad one fails at stage 1, the others finish.
    results = asyncio.run(serve_all(scheduler(rt, Failing(rt.sessions, rt.plan), policy="none"), reqs, stagger_s=0.01))
    assert isinstance(results[1], InferenceFailed)  # the cause is logged; the client learns which stage failed
    assert "stage 1 of m version 1" in str(results[1]) and "exploded" not in str(results[1])
    for (images, threshold, _), got in zip(reqs, results):
        if images is not bad:
            np.testing.assert_array_equal(got.class_id, rt.run(images, threshold=threshold).class_id)
    # The scheduler survived: the next requests are served.
    again = asyncio.run(serve_all(scheduler(rt, Failing(rt.sessions, rt.plan)), good))
    assert all(len(r) == 2 for r in again)


def test_one_thread_budget():
    cores = os.cpu_count() or 1
    assert thread_budget(ServeSettings(), cuda=False) == ((2, cores // 2) if cores >= 2 else (1, 1))
    assert thread_budget(ServeSettings(), cuda=True) == (2, max(1, cores // 2))
    assert thread_budget(ServeSettings(inference_threads=2, intra_op_threads=3), cuda=False) == (2, 3)


def test_auto_scheduling_picks_per_device_and_the_config_says_which():
    from reskd.service.serving.models import scheduling_policy

    cpu = Device.cpu()
    cuda = Device("cuda", (("CUDAExecutionProvider", {}), "CPUExecutionProvider"))  # described, never started
    assert ServeSettings().scheduler == "auto"
    assert scheduling_policy(ServeSettings(), cpu) == "stage"
    assert scheduling_policy(ServeSettings(), cuda) == "request"
    for explicit in ("stage", "request", "none"):
        assert scheduling_policy(ServeSettings(scheduler=explicit), cuda) == explicit


@pytest.mark.parametrize("policy", ["stage", "request"])
def test_stopping_answers_every_request_even_with_its_batch_running_and_admits_nothing_after(rt, policy):
    """Stopping (shutdown, or an unloaded version past its drain time) fails the requests still queued or in a
    running batch with QueueFull (503) saying why; before, a request whose batch was running waited forever."""
    started, release = threading.Event(), threading.Event()

    class Slow(HostEngine):
        def run(self, stage, parts, keep=False):
            started.set()
            release.wait(10)
            return super().run(stage, parts, keep)

    async def main():
        sched = scheduler(rt, Slow(rt.sessions, rt.plan), policy=policy)
        sched.start()
        rng = np.random.default_rng(3)
        futures = [sched.submit(rng.normal(size=(2, 1, 28, 28)).astype(np.float32)) for _ in range(3)]
        await asyncio.to_thread(started.wait, 10)
        assert not sched.idle
        await sched.stop("was unloaded")
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        with pytest.raises(QueueFull, match="m version 1 was unloaded"):
            sched.admit()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, QueueFull) and "was unloaded" in str(r) for r in results), results
