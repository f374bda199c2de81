"""Degrading under load, in process: the ladder a manifest gives, the controller's choice from given rates and costs
(a pure function), its hysteresis on a fake clock, and through the real scheduler and runtime: requests that set
their own exit settings or opt out are never degraded, degraded answers are the runtime's at that point, deadlines
answer from the stages run (equal to the runtime stopped there) or fail with DeadlineExceeded, and every exit reason
is reported."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reskd.cascade import EXIT_REASONS
from reskd.device import Device
from reskd.manifest import load_manifest
from reskd.runtime import CascadeRuntime
from reskd.service.serving.degrade import Controller, Costs, HostMeter, Point, choose, ladder, weights
from reskd.service.serving.metrics import Metrics
from reskd.service.serving.scheduler import CascadeScheduler, DeadlineExceeded
from server_process import BUNDLED, MODELS

FALLBACK = BUNDLED / "fashion-mnist-fallback" / "1"  # a version with stored operating points


@pytest.fixture(scope="module")
def rt():
    return CascadeRuntime(FALLBACK, device=Device.cpu(threads=1))


def test_the_ladder_runs_from_the_default_point_down_to_the_allowed_drop():
    manifest = load_manifest(FALLBACK)
    rungs = ladder(manifest, 1.0)
    top = manifest.operating_points.point(manifest.operating_points.default)
    assert rungs[0].id == top.id and rungs[0].accuracy == top.accuracy
    assert len(rungs) >= 3
    for a, b in zip(rungs, rungs[1:]):  # each cheaper and less accurate than the one before
        assert b.accuracy < a.accuracy and b.mean_flops < a.mean_flops
    assert all(100 * (top.accuracy - r.accuracy) <= 1.0 + 1e-9 for r in rungs)
    assert min(r.accuracy for r in ladder(manifest, 5.0)) < min(r.accuracy for r in rungs)  # the drop bounds it
    assert [r.id for r in ladder(manifest, 0.0)] == [top.id]
    assert ladder(load_manifest(MODELS / "fashion-mnist" / "1"), 1.0) == []  # no stored points: shed-only
    for r in rungs:  # reach: the share of images that run each stage, from the exit fractions
        assert r.reach[0] == pytest.approx(1.0) and r.reach[-1] == pytest.approx(r.exit_fractions[-1])


def test_the_choice_from_given_rates_and_costs():
    rungs = [Point("top", 0.94, 10.0, (0.5, 0.3, 0.2)), Point("mid", 0.935, 6.0, (0.7, 0.25, 0.05)),
             Point("low", 0.93, 4.0, (0.9, 0.1, 0.0))]
    costs = Costs(stage=[1.0, 1.0, 4.0], fixed=0.5)  # seconds per sample of each stage, per image besides
    w = weights(rungs, costs)
    assert w[0] == 1.0 and w[0] > w[1] > w[2]
    # per image: top 0.5 + 1 + 0.5 + 0.8 = 2.8; mid 0.5 + 1 + 0.3 + 0.2 = 2.0; low 0.5 + 1 + 0.1 = 1.6
    assert w == pytest.approx([1.0, 2.0 / 2.8, 1.6 / 2.8])
    capacity = 100.0  # top-point images per second
    assert choose(capacity, w, arrival=50) == 0  # carried at the top
    assert choose(capacity, w, arrival=120) == 1  # 120 * 0.714 = 86 <= 95
    assert choose(capacity, w, arrival=160) == 2
    assert choose(capacity, w, arrival=1000) == 2  # nothing carries it: the cheapest, and admission sheds the rest
    # the backlog to drain takes capacity first: the same arrivals need a cheaper point
    assert choose(capacity, w, arrival=120, backlog=40, drain_s=1.0) == 2
    # bound by HTTP and decoding: a cheaper point would not answer 10% more, so it is no option (shed instead)
    http_bound = weights(rungs, Costs(stage=[0.01, 0.01, 0.04], fixed=5.0))
    assert choose(capacity, http_bound, arrival=1000) == 0
    # on a GPU the host and device work overlap: the larger bounds the rate
    assert Costs(stage=[1.0, 1.0, 4.0], fixed=0.5, shared=False).per_image(rungs[0]) == pytest.approx(2.3)
    assert Costs(stage=[1.0, 1.0, 4.0], fixed=3.0, shared=False).per_image(rungs[2]) == 3.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hysteresis_down_at_once_up_after_the_hold():
    clock = FakeClock()
    rungs = [Point("top", 0.94, 10.0, (0.5, 0.3, 0.2)), Point("mid", 0.935, 6.0, (0.7, 0.25, 0.05)),
             Point("low", 0.93, 4.0, (0.9, 0.1, 0.0))]
    switches = []
    c = Controller(rungs, [1.0, 1.0, 4.0], slo_s=0.2, hold_s=5.0, host=HostMeter(cpu=lambda: 0.0, clock=clock),
                   clock=clock, on_switch=lambda a, b: switches.append((a, b)))
    for s, seconds in enumerate([1.0, 1.0, 4.0]):  # measured stage costs, the proportions above
        c.stages.ran(s, 1000, seconds)

    def offer(images_per_s: float, seconds: float, wait: float, rate: float = 100.0):
        end = clock.now + seconds
        while clock.now < end:
            clock.now += 0.05
            c.arrivals.add(images_per_s * 0.05)
            c.update(rate, wait)

    offer(80, 5, wait=0.05)  # carried at the top, short wait
    assert c.current == 0 and switches == []
    offer(300, 1, wait=0.05)  # heavy arrivals, but the wait is still short: stays
    assert c.current == 0
    offer(90, 5, wait=0.05)
    offer(90, 2, wait=0.15)  # a long wait, but arrivals the top point carries: the queue drains by itself
    assert c.current == 0
    offer(300, 1, wait=0.05)
    offer(300, 0.1, wait=0.15)  # the wait passes half the objective, the load is the cause: down at once, to
    assert c.current == 2 and switches == [(0, 2)]  # what carries the arrivals of the last moments
    offer(300, 2, wait=0.15)
    assert switches == [(0, 2)]  # no flapping while the load lasts
    offer(60, 4.5, wait=0.01)  # the load fell (the arrivals' 2 s window empties), but not for the hold time yet
    assert c.current == 2
    offer(60, 2.5, wait=0.01)  # held low for 5 s: straight back to the top, one switch
    assert c.current == 0 and switches == [(0, 2), (2, 0)]
    offer(60, 2, wait=0.01)
    assert switches == [(0, 2), (2, 0)]
    # a load the middle point carries: down to it, and while it lasts the top is never tried
    offer(120, 5, wait=0.11)
    assert c.current == 1
    offer(120, 10, wait=0.01)
    assert c.current == 1 and switches[-1] == (0, 1)


# --- through the real scheduler --------------------------------------------------------------------------------

def make_scheduler(rt, *, policy="stage", depth=2, degraded_to: int | None = None, runner=None, batch=64):
    rungs = ladder(rt.manifest, 1.0)
    metrics = Metrics()
    observer = metrics.for_model("m", 1, rt.manifest)
    observer.ladder(rungs)
    controller = Controller(rungs, rt.manifest.stage_flops, slo_s=0.25, hold_s=3600.0,
                            on_switch=observer.switched)
    if degraded_to is not None:
        controller._switch(degraded_to)
        controller.update = lambda *measured: controller.current  # held there for the test
    sched = CascadeScheduler(rt, runner or rt.engine, ThreadPoolExecutor(depth), model="m", version=1, policy=policy,
                             max_batch_sizes=[batch], max_queue_delays_s=[0.001],
                             max_queue_images=1024, pipeline_depth=depth, observer=observer, controller=controller,
                             cost_clock="thread")
    return sched, metrics


def images(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 28, 28)).astype(np.float32)


async def answer(sched, calls):
    sched.start()
    try:
        return await asyncio.gather(*(sched.submit(x, **kw) for x, kw in calls), return_exceptions=True)
    finally:
        await sched.stop()


def test_the_client_stays_in_charge_and_degraded_answers_are_the_runtimes_at_that_point(rt):
    x = images()
    sched, metrics = make_scheduler(rt, degraded_to=2)
    low = sched.controller.rungs[2]
    got = asyncio.run(answer(sched, [(x, {}), (x, {"threshold": 0.9}), (x, {"max_stage": 1}),
                                     (x, {"point": "default"}), (x, {"degrade": False})]))
    degraded, threshold, max_stage, point, opted_out = got
    want = rt.run(x, point=low.id)
    assert degraded.point == low.id and degraded.point_figures.accuracy == low.accuracy
    np.testing.assert_array_equal(degraded.class_id, want.class_id)
    np.testing.assert_array_equal(degraded.exit_stage, want.exit_stage)
    reasons = set(degraded.reasons())
    assert "load" in reasons and reasons <= {"confident", "final", "load"}
    # asked for: the runtime's own answer, never a cheaper point's
    for result, kw, point_id in [(threshold, {"threshold": 0.9}, None), (max_stage, {"max_stage": 1}, None),
                                 (point, {"point": "default"}, "default"), (opted_out, {}, "default")]:
        full = rt.run(x, **kw)
        np.testing.assert_array_equal(result.exit_stage, full.exit_stage)
        assert result.point == point_id and "load" not in result.reasons()
    assert opted_out.point_figures.accuracy == sched.controller.rungs[0].accuracy
    assert "max_stage" in max_stage.reasons()
    # the reasons and points are counted
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in metrics.registry.collect() for s in m.samples}

    def value(name, **labels):
        return sum(v for (n, lbl), v in samples.items() if n == name and set(labels.items()) <= set(lbl))

    loads = (degraded.exit_reason == EXIT_REASONS.index("load")).sum()
    assert value("reskd_exit_reasons_total", reason="load") == loads > 0
    assert value("reskd_point_images_total", point=low.id) == len(x)
    assert value("reskd_point_images_total", point="custom") == 2 * len(x)
    assert value("reskd_point_images_total", point="default") == 2 * len(x)
    top = rt.manifest.operating_points.point("default").accuracy
    assert value("reskd_expected_correct_total") == pytest.approx(len(x) * (low.accuracy + 2 * top))
    assert value("reskd_expected_images_total") == 3 * len(x)
    assert value("reskd_degrade_level") == 2 and value("reskd_operating_point", point=low.id) == 1
    assert value("reskd_point_switches_total", direction="down") == 1


class SlowStageZero:
    """The real runner, with stage 0 slowed down: a deadline passes while a batch runs."""

    def __init__(self, runner, seconds):
        self.runner, self.seconds = runner, seconds
        self.max_blocks = runner.max_blocks

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, stage, parts, keep=False):
        if stage == 0:
            time.sleep(self.seconds)
        return self.runner.run(stage, parts, keep)


@pytest.mark.parametrize("policy", ["stage", "request"])
def test_a_deadline_answers_from_the_stages_run(rt, policy):
    x = images(24, seed=3)
    sched, _ = make_scheduler(rt, policy=policy, runner=SlowStageZero(rt.engine, 0.15))
    (late,) = asyncio.run(answer(sched, [(x, {"threshold": 1.0, "timeout_s": 0.05})]))
    want = rt.run(x, max_stage=0)  # the runtime stopped after stage 0
    assert late.reasons() == ["deadline"] * len(x)
    np.testing.assert_array_equal(late.exit_stage, want.exit_stage)
    np.testing.assert_array_equal(late.class_id, want.class_id)
    np.testing.assert_allclose(late.logits, want.logits, atol=1e-5)
    np.testing.assert_array_equal(late.flops, want.flops)


def test_a_deadline_before_any_stage_fails_the_request(rt):
    x = images(8, seed=4)
    # one batch at a time, of one request: the second waits in the queue while the first runs
    sched, _ = make_scheduler(rt, policy="request", depth=1, batch=8, runner=SlowStageZero(rt.engine, 0.3))
    first, second = asyncio.run(answer(sched, [(x, {}), (x, {"timeout_s": 0.05})]))
    assert not isinstance(first, Exception)
    assert isinstance(second, DeadlineExceeded)
    assert "8 of its 8 images not yet run by any stage" in str(second) and "50 ms" in str(second)
