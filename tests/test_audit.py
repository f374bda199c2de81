"""The shadow audit and the drift signal, in process through the real scheduler and runtimes: audited answers are
compared with exactly what the audit model computes; the answer never waits for the audit (an audit model blocked on
an event does not hold a response); what is not audited is counted by reason (budget, busy, unloaded, no_reference);
references and the stage-0 energy score match what calibration stored; the audit reference a manifest names."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from reskd.device import Device
from reskd.exit_policy import energy
from reskd.manifest import load_manifest
from reskd.runtime import CascadeRuntime
from reskd.service.serving.audit import Auditor, AuditReference, audit_reference
from reskd.service.serving.metrics import Metrics
from reskd.service.serving.scheduler import CascadeScheduler
from server_process import BUNDLED

FALLBACK = BUNDLED / "fashion-mnist-fallback" / "1"  # audited against its own fallback stage (the teacher)
CASCADE = BUNDLED / "fashion-mnist" / "2"  # audited against another version: fashion-mnist-teacher:2
TEACHER = BUNDLED / "fashion-mnist-teacher" / "2"


@pytest.fixture(scope="module")
def fallback():
    return CascadeRuntime(FALLBACK, device=Device.cpu(threads=1))


@pytest.fixture(scope="module")
def cascade():
    return CascadeRuntime(CASCADE, device=Device.cpu(threads=1))


@pytest.fixture(scope="module")
def teacher():
    return CascadeRuntime(TEACHER, device=Device.cpu(threads=1))


@pytest.fixture(scope="module")
def test_images():
    """Real Fashion-MNIST test images, normalised as the server does (the drift and audit figures are about them)."""
    import gzip

    from conftest import FASHION_MNIST_DIR, real_fashion_mnist_or_fail
    from reskd.preprocess import normalise

    real_fashion_mnist_or_fail()
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 1, 28, 28)[:400]
    return normalise(pixels, load_manifest(FALLBACK).input).astype(np.float32)


def scheduler(rt, auditor_of, depth=2):
    metrics = Metrics()
    observer = metrics.for_model("m", 1, rt.manifest)
    auditor = auditor_of(observer)
    sched = CascadeScheduler(rt, rt.engine, ThreadPoolExecutor(depth), model="m", version=1, policy="stage",
                             max_batch_sizes=[64], max_queue_delays_s=[0.001], max_queue_images=1024,
                             pipeline_depth=depth, observer=observer, auditor=auditor,
                             audit_executor=ThreadPoolExecutor(1))
    return sched, metrics, auditor


def value(metrics: Metrics, name: str, **labels) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def serve(sched, batches, **kwargs):
    """Each batch as a request, the next once the audit of the one before is done (it runs after the answer, on
    spare capacity: requests back to back would leave it none)."""
    sched.start()
    try:
        results = []
        for x in batches:
            results.append(await sched.submit(x, **kwargs))
            for _ in range(6000):
                if not sched.auditor.pending and not sched.auditor.running:
                    break
                await asyncio.sleep(0.005)
        return results
    finally:
        await sched.stop()


def test_audited_answers_are_compared_with_what_the_audit_model_computes(fallback, test_images):
    x = test_images
    sched, metrics, auditor = scheduler(fallback, lambda obs: Auditor(
        fallback, AuditReference(stage=2), lambda *_: None, fraction=1.0, max_compute_pct=1000, observer=obs))
    results = asyncio.run(serve(sched, [x[i:i + 50] for i in range(0, len(x), 50)]))
    answered = np.concatenate([r.class_id for r in results])
    stages = np.concatenate([r.exit_stage for r in results])
    teacher = fallback.stage_logits(2, x).argmax(-1)
    early = stages < 2
    assert early.sum() > 100
    for s in (0, 1):
        mine = stages == s
        assert value(metrics, "reskd_audit_images_total", stage=str(s)) == mine.sum()
        assert value(metrics, "reskd_audit_agreements_total", stage=str(s)) == (answered[mine] == teacher[mine]).sum()
        # every answer ran at the default point: its expectation is the stored agreement at that stage
        expected = fallback.manifest.audit.points[fallback.manifest.operating_points.default][s]
        assert value(metrics, "reskd_audit_expected_agreements_total", stage=str(s)) == \
            pytest.approx(mine.sum() * expected)
    assert value(metrics, "reskd_audit_images_total", stage="2") == 0  # the reference itself is never audited
    assert value(metrics, "reskd_audit_dropped_total") == 0
    # the drift signal: the stage-0 energy of each image, against the stored 99th percentile
    score = energy(fallback.stage_logits(0, x))
    assert np.allclose(np.concatenate([r.score0 for r in results]), score)
    assert value(metrics, "reskd_ood_images_total") == (score > fallback.manifest.drift.p99).sum()


def test_a_version_audited_against_another_one(cascade, teacher, test_images):
    x = test_images[:200]
    served = {"fashion-mnist-teacher": teacher}
    sched, metrics, _ = scheduler(cascade, lambda obs: Auditor(
        cascade, audit_reference(cascade, None), lambda name, version: served.get(name), fraction=1.0,
        max_compute_pct=1000, observer=obs))
    results = asyncio.run(serve(sched, [x]))
    early = results[0].exit_stage < 1
    agree = results[0].class_id[early] == teacher.run(x[early]).class_id
    assert value(metrics, "reskd_audit_images_total") == early.sum()
    assert value(metrics, "reskd_audit_agreements_total") == agree.sum()


def test_the_answer_does_not_wait_for_a_blocked_audit_model(fallback, teacher, test_images):
    x = test_images[:64]
    gate, entered = threading.Event(), threading.Event()

    class Blocked:  # the audit model: blocks until the test lets it go
        stage_flops = teacher.stage_flops
        cum_flops = teacher.cum_flops

        def run(self, images, **kwargs):
            entered.set()
            gate.wait(30)
            return teacher.run(images, **kwargs)

    blocked = Blocked()
    sched, metrics, auditor = scheduler(fallback, lambda obs: Auditor(
        fallback, AuditReference(model="t:1"), lambda *_: blocked, fraction=1.0, max_compute_pct=1000,
        observer=obs))

    async def scenario():
        sched.start()
        try:
            first = await asyncio.wait_for(sched.submit(x[:32]), 30)
            assert await asyncio.to_thread(entered.wait, 30)  # the audit of the first request is running, stuck
            second = await asyncio.wait_for(sched.submit(x[32:]), 30)  # answered all the same
            assert auditor.running
            gate.set()
            for _ in range(2000):
                if not auditor.pending and not auditor.running:
                    break
                await asyncio.sleep(0.005)
            return first, second
        finally:
            gate.set()
            await sched.stop()

    first, second = asyncio.run(scenario())
    early = (first.exit_stage < 2).sum() + (second.exit_stage < 2).sum()
    assert value(metrics, "reskd_audit_images_total") == early  # and audited once it was let go


def test_what_is_not_audited_is_counted_by_reason(fallback, test_images):
    x = test_images[:200]
    n_early = int((fallback.run(x).exit_stage < 2).sum())
    # unloaded: the audit model is not served; the audit pauses
    sched, metrics, _ = scheduler(fallback, lambda obs: Auditor(
        fallback, AuditReference(model="gone:1"), lambda *_: None, fraction=1.0, max_compute_pct=1000,
        observer=obs))
    asyncio.run(serve(sched, [x]))
    assert value(metrics, "reskd_audit_dropped_total", reason="unloaded") == n_early
    assert value(metrics, "reskd_audit_images_total") == 0
    # budget: 1% of the served FLOPs buys far fewer teacher runs than half the early answers
    sched, metrics, _ = scheduler(fallback, lambda obs: Auditor(
        fallback, AuditReference(stage=2), lambda *_: None, fraction=0.5, max_compute_pct=1, observer=obs))
    asyncio.run(serve(sched, [x]))
    audited = value(metrics, "reskd_audit_images_total")
    dropped = value(metrics, "reskd_audit_dropped_total", reason="budget")
    flops = fallback.run(x).flops.sum()
    assert audited == int(0.01 * flops // fallback.stage_flops[2])
    assert audited + dropped == n_early // 2  # systematic: every second early answer picked
    # no_reference: a client's own threshold has no validation figure to compare with
    sched, metrics, _ = scheduler(fallback, lambda obs: Auditor(
        fallback, AuditReference(stage=2), lambda *_: None, fraction=1.0, max_compute_pct=1000, observer=obs))
    results = asyncio.run(serve(sched, [x], threshold=0.5))
    assert value(metrics, "reskd_audit_dropped_total", reason="no_reference") == (results[0].exit_stage < 2).sum()
    assert value(metrics, "reskd_audit_images_total") == 0


def test_busy_audits_wait_for_spare_capacity_then_go_stale(fallback, test_images):
    clock = [0.0]
    metrics = Metrics()
    observer = metrics.for_model("m", 1, fallback.manifest)
    auditor = Auditor(fallback, AuditReference(stage=2), lambda *_: None, fraction=1.0, max_compute_pct=1000,
                      observer=observer, clock=lambda: clock[0])
    result = fallback.run(test_images[:100])
    auditor._budget = 1e15
    auditor.offer(test_images[:100], result, "default")
    early = int((result.exit_stage < 2).sum())
    assert auditor.pending_images == early
    batch, audit = auditor.take()  # at most BATCH images at once
    assert sum(map(len, batch)) == Auditor.BATCH and auditor.running
    auditor.record(batch, Auditor.run(batch, audit))
    clock[0] = Auditor.STALE_S + 1  # no spare capacity for that long: the rest is dropped
    auditor.expire()
    assert auditor.pending_images == 0
    assert value(metrics, "reskd_audit_dropped_total", reason="busy") == early - Auditor.BATCH
    assert value(metrics, "reskd_audit_images_total") == Auditor.BATCH


def test_the_reference_a_manifest_names():
    assert audit_reference(CascadeRuntime(FALLBACK, device=Device.cpu(threads=1)), None) == AuditReference(stage=2)
    rt = CascadeRuntime(CASCADE, device=Device.cpu(threads=1))
    assert audit_reference(rt, None) == AuditReference(model="fashion-mnist-teacher:2")
    rt.manifest = rt.manifest.model_copy(update={"audit": None})  # an older manifest: RESKD_AUDIT_MODEL
    assert audit_reference(rt, "x:1") == AuditReference(model="x:1")
    assert audit_reference(CascadeRuntime(TEACHER, device=Device.cpu(threads=1)), "x:1") is None  # one stage


def test_the_stored_references_are_what_the_runtime_gives_on_validation(tmp_path: Path):
    """The manifest's drift p99 is the 99th percentile of the stage-0 energy on its validation split: about 1% of
    the split is above it."""
    m = load_manifest(FALLBACK)
    assert m.drift.above_p99 == pytest.approx(0.01, abs=0.002)
    assert m.drift.quantiles[m.drift.levels.index(0.99)] == pytest.approx(m.drift.p99)
    assert m.audit.stage == 2 and m.audit.points[m.operating_points.default][2] is None


def test_each_answer_is_held_to_its_own_points_reference(fallback, test_images):
    """An answer of a point chosen under load is compared with that point's validation agreement at its exit stage,
    an answer cut short by a deadline with its stage's over every image, and a client's own threshold with none."""
    from reskd.cascade import DEADLINE

    spec = fallback.manifest.audit
    seen = []

    class Observer:
        def audited(self, stages, agree, expected):
            seen.append(expected)

        def audit_dropped(self, reason, images):
            seen.append(reason)

    auditor = Auditor(fallback, AuditReference(stage=2), lambda *_: None, fraction=1.0, max_compute_pct=10000,
                      observer=Observer())
    x = test_images[:2]
    result = fallback.run(x, max_stage=1, threshold=1.0)  # both answered at stage 1
    result.exit_reason[:] = [DEADLINE, 0]
    auditor._budget = 1e15
    assert spec.points["budget-14"][1] not in (None, spec.stage_agreement[1])
    auditor.offer(x, result, "budget-14")
    assert auditor.pending[0].expected.tolist() == [spec.stage_agreement[1], spec.points["budget-14"][1]]
    auditor.offer(x, result, None)  # the client's own exit settings: no reference
    assert seen == ["no_reference"] and len(auditor.pending) == 1
