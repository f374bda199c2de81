"""The shadow audit: how often the answers a version gives early agree with its teacher, measured on live traffic
without labels (RESKD_AUDIT_FRACTION).

An early-exit cascade that is wrong with confidence looks healthy: it saves more compute and answers faster. So a
share of the answers given before the last stage is run again through the version's *audit model* — its own
fallback stage (the teacher, in a cascade that ends with it), else the version its manifest names (audit.model, then
teacher.model), else RESKD_AUDIT_MODEL — and compared with it. The manifest stores what that comparison gave on
the validation split, per operating point and exit stage (export/calibrate.py `references`): each audited answer
adds its own expectation to reskd_audit_expected_agreements_total, so the served agreement is compared with the
mixture of points actually served (a point chosen under load, an answer cut short by a deadline: each against its
own reference).

The audit never costs a client anything it would notice:
- it starts after the response is sent (the scheduler offers an answered request only once its future is set);
- images are picked systematically (every 1/fraction-th eligible answer, so a fraction of 1 audits all of them);
- a token bucket in FLOPs holds it to RESKD_AUDIT_MAX_COMPUTE_PCT of the FLOPs the version serves; what would
  exceed it is dropped (reason `budget`);
- it runs only on spare capacity: the scheduler starts an audit batch only with an inference slot free and no
  sample of the version queued or being read, one audit batch at a time, of at most BATCH images; audits waiting
  longer than STALE_S, or beyond MAX_PENDING images, are dropped (`busy`);
- an audit model that is not served (unloaded, or not in the repository) pauses the audit (`unloaded`); answers of
  a client's own threshold or max_stage have no validation reference in a version that stores them
  (`no_reference`); an audit batch that fails is logged and counted (`failed`).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from reskd.cascade import DEADLINE, CascadeResult
from reskd.manifest import parse_model_ref
from reskd.runtime import CascadeRuntime

log = logging.getLogger("reskd.service")

# Why a sampled answer was not audited: the `reason` label of reskd_audit_dropped_total, every value present from
# the start.
DROP_REASONS = ("budget", "busy", "unloaded", "no_reference", "failed")


class AuditObserver(Protocol):
    """What the audit reports (the server's is its version's ModelMetrics)."""

    def audited(self, stages: np.ndarray, agree: np.ndarray, expected: np.ndarray) -> None: ...

    def audit_dropped(self, reason: str, images: int) -> None: ...


@dataclass(frozen=True)
class AuditReference:
    """What a version's answers are compared with: a stage of its own runtime (`stage`), or a version of the
    repository by name (`model`, resolved when the audit runs: it may be loaded or unloaded meanwhile)."""
    stage: int | None = None
    model: str | None = None

    def describe(self) -> str:
        return f"stage {self.stage}" if self.stage is not None else str(self.model)


def audit_reference(runtime: CascadeRuntime, fallback_model: str | None) -> AuditReference | None:
    """The version's audit model: the manifest's audit section (its fallback stage or a version), else its
    teacher.model, else `fallback_model` (RESKD_AUDIT_MODEL); None for a one-stage version or when none is named."""
    if runtime.num_stages < 2:
        return None
    stage, model = runtime.manifest.audit_target()
    if stage is not None:
        return AuditReference(stage=stage)
    model = model or fallback_model
    return AuditReference(model=model) if model else None


@dataclass
class _Pending:
    images: np.ndarray  # float32 [k, C, H, W]
    answered: np.ndarray  # int64 [k]: the class each was answered with
    stages: np.ndarray  # int [k]: where each left
    expected: np.ndarray  # float64 [k]: its validation agreement (NaN: none stored)
    queued: float  # when it was offered (the auditor's clock)

    def __len__(self) -> int:
        return len(self.answered)

    def split(self, k: int) -> tuple[_Pending, _Pending]:
        """The first k images, and the rest (both queued when this was)."""
        def part(rows: slice) -> _Pending:
            return _Pending(self.images[rows], self.answered[rows], self.stages[rows], self.expected[rows],
                            self.queued)
        return part(slice(None, k)), part(slice(k, None))


Resolve = Callable[[str, int | None], CascadeRuntime | None]


class Auditor:
    """One version's shadow audit in one server process. offer() and take() run on the event loop; run() in an
    inference thread; record() on the loop again."""

    BATCH = 8  # images per audit batch: one batch is the longest a request can wait behind the audit
    MAX_PENDING = 256  # images waiting for spare capacity
    STALE_S = 10.0  # an audit that found no spare capacity for this long is dropped
    BURST = 64  # the FLOPs saved up hold at most this many audits (no burst of audits after a quiet spell)

    def __init__(self, runtime: CascadeRuntime, reference: AuditReference, resolve: Resolve, *, fraction: float,
                 max_compute_pct: float, observer: AuditObserver, clock: Callable[[], float] = time.perf_counter):
        self.runtime = runtime
        self.reference = reference
        self.resolve = resolve
        self.fraction = fraction
        self.max_compute = max_compute_pct / 100
        self.observer = observer
        self.clock = clock
        self.spec = runtime.manifest.audit  # the validation figures (None: audited without a reference)
        self.last = runtime.num_stages - 1
        self._credit = 0.0  # systematic sampling: one audit each time it reaches 1
        self._budget = 0.0  # FLOPs the audit may still spend
        self.pending: collections.deque[_Pending] = collections.deque()
        self.pending_images = 0
        self.running = False  # an audit batch is in flight

    # --- on the loop -------------------------------------------------------------------------------------------
    def audit_runtime(self) -> tuple[CascadeRuntime, int | None] | None:
        """(runtime, stage) to compute the reference class with: (own runtime, its fallback stage) or (the audit
        version's runtime, None: every stage of it); None when that version is not served now."""
        if self.reference.stage is not None:
            return self.runtime, self.reference.stage
        name, version = parse_model_ref(self.reference.model)
        other = self.resolve(name, version)
        return (other, None) if other is not None else None

    def cost(self, audit: tuple[CascadeRuntime, int | None]) -> float:
        """FLOPs of one image's audit."""
        runtime, stage = audit
        return float(runtime.stage_flops[stage] if stage is not None else runtime.cum_flops[-1])

    def offer(self, images: np.ndarray, result: CascadeResult, point: str | None) -> None:
        """A request has been answered (its response is on its way): pick its answers to audit."""
        earned = self.max_compute * float(result.flops.sum())
        self._budget += earned
        early = np.flatnonzero(result.exit_stage < self.last)
        if len(early) == 0 or self.fraction == 0:
            return
        credit = self._credit + self.fraction * np.arange(1, len(early) + 1)
        picked = early[np.floor(credit) > np.floor(np.concatenate([[self._credit], credit[:-1]]))]
        self._credit = float(credit[-1] % 1.0)
        if len(picked) == 0:
            return
        stages = result.exit_stage[picked]
        reasons = result.exit_reason[picked] if result.exit_reason is not None else np.zeros(len(picked), np.int8)
        expected = np.full(len(picked), np.nan)
        if self.spec is not None:
            known = [self.spec.expected(point, int(s), deadline=int(r) == DEADLINE) for s, r in zip(stages, reasons)]
            expected = np.asarray([np.nan if e is None else e for e in known], np.float64)
            keep = ~np.isnan(expected)
            if not keep.all():
                self.observer.audit_dropped("no_reference", int((~keep).sum()))
                picked, stages, expected = picked[keep], stages[keep], expected[keep]
                if len(picked) == 0:
                    return
        audit = self.audit_runtime()
        if audit is None:
            self.observer.audit_dropped("unloaded", len(picked))
            return
        cost = self.cost(audit)
        # what was saved up before this request is capped; its own share is always there to spend
        self._budget = min(self._budget - earned, self.BURST * cost) + earned
        affordable = int(self._budget // cost)
        if affordable < len(picked):
            self.observer.audit_dropped("budget", len(picked) - affordable)
            picked, stages, expected = picked[:affordable], stages[:affordable], expected[:affordable]
            if len(picked) == 0:
                return
        if self.pending_images + len(picked) > self.MAX_PENDING:
            self.observer.audit_dropped("busy", len(picked))
            return
        self._budget -= cost * len(picked)
        self.pending.append(_Pending(np.array(images[picked]), result.class_id[picked].copy(), stages, expected,
                                     self.clock()))
        self.pending_images += len(picked)

    def expire(self) -> None:
        """Drop the audits that waited too long for spare capacity."""
        now = self.clock()
        while self.pending and now - self.pending[0].queued > self.STALE_S:
            item = self.pending.popleft()
            self.pending_images -= len(item)
            self.observer.audit_dropped("busy", len(item))

    @property
    def ready(self) -> bool:
        return bool(self.pending) and not self.running

    def take(self) -> tuple[list[_Pending], tuple[CascadeRuntime, int | None]] | None:
        """The next audit batch (at most BATCH images) off the pending queue, and what to run it on; None when the
        audit model is not served now (the batch is dropped and counted: the audit pauses until it is)."""
        batch, size = [], 0
        while self.pending and size < self.BATCH:
            item = self.pending.popleft()
            room = self.BATCH - size
            if len(item) > room:  # audit the first images now, the rest in a later batch
                item, rest = item.split(room)
                self.pending.appendleft(rest)
            batch.append(item)
            size += len(item)
        self.pending_images -= size
        audit = self.audit_runtime()
        if audit is None:
            self.observer.audit_dropped("unloaded", size)
            return None
        self.running = True
        return batch, audit

    def record(self, batch: list[_Pending], reference: np.ndarray | None) -> None:
        """The audit batch has run: reference holds the audit model's class for each image, in the batch's order
        (None: it failed, logged by the caller)."""
        self.running = False
        size = sum(map(len, batch))
        if reference is None:
            self.observer.audit_dropped("failed", size)
            return
        answered = np.concatenate([b.answered for b in batch])
        stages = np.concatenate([b.stages for b in batch])
        expected = np.concatenate([b.expected for b in batch])
        self.observer.audited(stages, answered == reference, expected)

    # --- in an inference thread ----------------------------------------------------------------------------------
    @staticmethod
    def run(batch: list[_Pending], audit: tuple[CascadeRuntime, int | None]) -> np.ndarray:
        """The audit model's class for each image of the batch."""
        images = np.concatenate([b.images for b in batch])
        runtime, stage = audit
        if stage is not None:
            return runtime.stage_logits(stage, images).argmax(-1)
        return runtime.run(images, early_exit=False).class_id
