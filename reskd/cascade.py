"""One step of a cascade: the only code that turns a stage's output into running logits, confidence and exits.

The runtime's run loop (reskd.runtime), the server's stage scheduler (reskd.service.serving.scheduler) and, through the
same exit rule, calibration (reskd.exit_policy) all go through here, so what is calibrated is exactly what is
served. numpy only.

A batch of samples goes through the stages in order. Each stage has its combine: after a `sum` stage (ResKD) a
sample's running logits are the running logits before it plus the stage's output (added in float64); after a
`replace` stage (a confidence cascade of independent models, or a fallback such as the teacher after summed
stages) they are the stage's own logits. A sample leaves when it has reached its last stage (max_stage) or, before the
final stage, when its confidence reaches its threshold for stage s. Every sample carries its own thresholds and
last stage, so one batch may hold requests with different settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .exit_policy import confidence, energy, leaves_after


class CascadeInputError(ValueError):
    """Images or exit settings a cascade cannot run as given; the message says what to fix (HTTP 422)."""


EXIT_REASONS = ("confident", "final", "max_stage", "load", "deadline")
CONFIDENT, FINAL, MAX_STAGE, LOAD, DEADLINE = range(len(EXIT_REASONS))


@dataclass
class CascadeResult:
    logits: np.ndarray  # float32 [N, classes]: running logits at the exit stage (summed in float64)
    class_id: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float64 [N], the manifest's exit measure at the exit stage
    exit_stage: np.ndarray  # int32 [N]
    flops: np.ndarray  # int64 [N]: sum of the FLOPs of the stages each sample ran
    exit_reason: np.ndarray | None = None  # int8 [N]: an index into EXIT_REASONS (None: not recorded)
    # The operating point the samples ran at (a server's answer): its id (None when the exit settings were the
    # client's own threshold or max_stage) and what validation measured for it (the server's record, or None)
    point: str | None = None
    point_figures: Any = None
    # The energy score of each sample's stage-0 logits (reskd.exit_policy.energy): the drift signal (None: not
    # recorded)
    score0: np.ndarray | None = None

    def reasons(self) -> list[str]:
        """Each sample's exit reason by name."""
        if self.exit_reason is None:
            return []
        return [EXIT_REASONS[r] for r in self.exit_reason.tolist()]

    def __len__(self) -> int:
        return len(self.class_id)


@dataclass(frozen=True)
class ExitRule:
    """What a model version's manifest fixes about exits: the confidence measure, the number of stages and how each
    stage's logits make the running logits (one kind for every stage, or one per stage)."""

    measure: str
    num_stages: int
    combine: str | Sequence[str] = "sum"

    def __post_init__(self):
        object.__setattr__(self, "combine", stage_kinds(self.combine, self.num_stages))


@dataclass(frozen=True)
class Step:
    running: np.ndarray  # float64 [n, classes]: running logits after the stage
    confidence: np.ndarray  # float64 [n]
    leave: np.ndarray  # bool [n]: the sample's answer is final after this stage


COMBINE_KINDS = ("sum", "replace")


def combine(running: np.ndarray, logits: np.ndarray, kind: str = "sum") -> np.ndarray:
    """Running logits after a stage, float64: "sum", the sum of the stage outputs so far (float64 + float32,
    added in stage order, so every caller gets the same bits); "replace", the stage's own logits."""
    if kind == "sum":
        return running + logits
    if kind == "replace":
        return np.asarray(logits, dtype=np.float64)
    raise ValueError(f"combine must be one of {COMBINE_KINDS}, got {kind!r}")


def stage_kinds(kinds: str | Sequence[str], num_stages: int) -> tuple[str, ...]:
    """One combine kind per stage, from one kind for all or a list of one per stage (checked)."""
    kinds = (kinds,) * num_stages if isinstance(kinds, str) else tuple(kinds)
    if len(kinds) != num_stages:
        raise ValueError(f"combine needs one kind per stage ({num_stages}), got {len(kinds)}: {list(kinds)}")
    for kind in kinds:
        if kind not in COMBINE_KINDS:
            raise ValueError(f"combine must be one of {COMBINE_KINDS}, got {kind!r}")
    return kinds


def running_logits(stage_outputs, kinds: str | Sequence[str] = "sum") -> np.ndarray:
    """Every stage's outputs [S, N, C] (any float type) -> the running logits after each stage, [S, N, C] float64:
    what `combine` gives stage by stage with each stage's kind (one for all, or one per stage)."""
    outputs = np.asarray(stage_outputs, dtype=np.float64)
    out = np.empty_like(outputs)
    running = np.zeros(outputs.shape[1:], np.float64)
    for s, kind in enumerate(stage_kinds(kinds, len(outputs))):
        out[s] = running = combine(running, outputs[s], kind)
    return out


def cascade_step(rule: ExitRule, stage: int, running: np.ndarray, logits: np.ndarray, thresholds: np.ndarray,
                 last: np.ndarray, early_exit: bool = True) -> Step:
    """Stage `stage` has produced `logits` for n samples whose running logits before it were `running`.
    thresholds: [n, stages - 1] float64, each sample's exit thresholds; last: [n], each sample's last stage.
    early_exit=False lets samples leave only at their last stage (every stage runs)."""
    total = combine(running, logits, rule.combine[stage])
    conf = confidence(total, rule.measure)
    if early_exit:
        leave = leaves_after(stage, rule.num_stages, conf, thresholds, last)
    else:
        leave = last == stage
    return Step(total, conf, leave)


class CascadeSamples:
    """N samples on their way through a cascade: their exit settings and their state so far. reference: the
    thresholds and last stage each sample was asked for, when the server runs it at cheaper ones (exit reasons)."""

    def __init__(self, thresholds: np.ndarray, last: np.ndarray, classes: int,
                 reference: tuple[np.ndarray, np.ndarray] | None = None):
        n = len(last)
        self.thresholds = thresholds  # [n, stages - 1] float64
        self.last = last  # [n] int32
        self.reference = reference or (thresholds, last)
        self.running = np.zeros((n, classes), np.float64)
        self.confidence = np.zeros(n, np.float64)
        self.exit_stage = last.copy()
        self.exit_reason = np.full(n, FINAL, np.int8)
        self.score0 = np.zeros(n, np.float64)  # energy of the stage-0 logits, set when stage 0 has run

    def settle(self, rows: np.ndarray, stage: int, reason: int) -> None:
        """Rows answered now from the running logits they have after `stage` (a deadline)."""
        self.exit_stage[rows] = stage
        self.exit_reason[rows] = reason

    def __len__(self) -> int:
        return len(self.last)

    def result(self, cum_flops: np.ndarray) -> CascadeResult:
        """Valid once every sample has left."""
        return CascadeResult(self.running.astype(np.float32), self.running.argmax(-1).astype(np.int64),
                             self.confidence, self.exit_stage, cum_flops[self.exit_stage].astype(np.int64),
                             self.exit_reason, score0=self.score0)


Part = tuple[CascadeSamples, np.ndarray]  # some samples (row indices) of one CascadeSamples


def advance(rule: ExitRule, stage: int, parts: Sequence[Part], logits: np.ndarray,
            early_exit: bool = True) -> list[np.ndarray]:
    """Apply stage `stage`'s logits to the samples of `parts` (logits rows in the parts' order), in one vectorised
    cascade_step, and record the new state and every exit in their CascadeSamples. -> per part, a bool mask of
    its rows that left."""
    if len(parts) == 1:
        samples, rows = parts[0]
        running, thresholds, last = samples.running[rows], samples.thresholds[rows], samples.last[rows]
    else:
        running = np.concatenate([s.running[rows] for s, rows in parts])
        thresholds = np.concatenate([s.thresholds[rows] for s, rows in parts])
        last = np.concatenate([s.last[rows] for s, rows in parts])
    out = cascade_step(rule, stage, running, logits, thresholds, last, early_exit)
    score0 = energy(out.running) if stage == 0 else None  # the running logits after stage 0 are its own
    masks, offset = [], 0
    for samples, rows in parts:
        part = slice(offset, offset + len(rows))
        offset += len(rows)
        samples.running[rows] = out.running[part]
        samples.confidence[rows] = out.confidence[part]
        if score0 is not None:
            samples.score0[rows] = score0[part]
        leave = out.leave[part]
        left = rows[leave]
        samples.exit_stage[left] = stage
        samples.exit_reason[left] = exit_reasons(rule, stage, out.confidence[part][leave],
                                                 samples.reference[0][left], samples.reference[1][left])
        masks.append(leave)
    return masks


def exit_reasons(rule: ExitRule, stage: int, conf: np.ndarray, thresholds: np.ndarray,
                 last: np.ndarray) -> np.ndarray:
    """Why samples that left after `stage` left, judged against the policy they were asked for (thresholds
    [n, stages - 1] and last stage [n]): the final stage; confident enough for that policy; its last stage; else the
    server's cheaper point let it leave (load)."""
    reason = np.full(len(conf), LOAD, np.int8)
    if stage == rule.num_stages - 1:
        reason[:] = FINAL
        return reason
    reason[last == stage] = MAX_STAGE
    reason[conf >= thresholds[:, stage]] = CONFIDENT
    return reason
