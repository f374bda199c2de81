"""When a sample may leave the cascade: confidence measures, exit simulation and threshold calibration.

numpy only (no torch, no onnxruntime): the training report, calibration and the serving runtime all decide exits
with this one module, so what is calibrated is exactly what is served.

Shapes: `logits` is [S, N, C] — for every stage s the *running* (cumulative) logits of N samples over C classes.
`conf` is [S, N]. A threshold vector has S-1 entries: a sample leaves after the first stage s < S-1 whose
confidence reaches thresholds[s]; the last stage always answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MEASURES = ("max_prob", "margin", "entropy")


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis in float64: fp32 max-probability saturates at exactly 1.0 for confident
    samples, which would make every threshold above ~0.9999999 equivalent."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def confidence(logits: np.ndarray, measure: str = "max_prob") -> np.ndarray:
    """Confidence in [0, 1] per sample (reduces the last axis)."""
    logp = log_softmax64(logits)
    if measure == "max_prob":
        return np.exp(logp.max(axis=-1))
    if measure == "margin":
        top2 = np.sort(logp, axis=-1)[..., -2:]
        return np.exp(top2[..., 1]) - np.exp(top2[..., 0])
    if measure == "entropy":
        p = np.exp(logp)
        h = -(p * logp).sum(axis=-1)
        return 1.0 - h / np.log(logp.shape[-1])
    raise ValueError(f"unknown exit measure {measure!r}; use one of {', '.join(MEASURES)}")


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score of logits, -logsumexp over the last axis, float64 (Liu et al., NeurIPS 2020): low on inputs
    like the training data, higher on inputs unlike it. Unlike max_prob it keeps the logits' scale, which
    softmax throws away, so a sample the model has no strong evidence for scores high even when one class beats the
    others. The server's drift signal on stage 0's logits (docs/serving.md, "Monitoring")."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    return -(top + np.log(np.exp(z - top[..., None]).sum(axis=-1)))


def leaves_after(stage: int, num_stages: int, conf: np.ndarray, thresholds: np.ndarray,
                 last: np.ndarray) -> np.ndarray:
    """The exit rule, for n samples that have just run `stage`: a sample leaves at its last stage, and before the
    final stage as soon as its confidence reaches its threshold. conf [n]; thresholds [n, num_stages - 1], each
    sample's own; last [n]. -> bool [n]."""
    leave = np.asarray(last) == stage
    if stage < num_stages - 1:
        leave |= conf >= thresholds[:, stage]
    return leave


def exit_stages(conf: np.ndarray, thresholds, max_stage: int | None = None) -> np.ndarray:
    """Index of the stage each sample exits at: the first s < last with conf[s] >= thresholds[s], else last
    (max_stage, default the final stage S-1)."""
    conf = np.asarray(conf)
    n_stages, n = conf.shape
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (n_stages - 1,):
        raise ValueError(f"need {n_stages - 1} thresholds for {n_stages} stages, got {thresholds.shape[0]}")
    table = np.broadcast_to(thresholds, (n, n_stages - 1))
    stop = n_stages - 1 if max_stage is None else max_stage
    last = np.full(n, stop)
    out = last.astype(np.int64)
    undecided = np.ones(n, dtype=bool)
    for s in range(stop):
        leave = undecided & leaves_after(s, n_stages, conf[s], table, last)
        out[leave] = s
        undecided &= ~leave
    return out


@dataclass
class ExitOutcome:
    thresholds: list[float]
    accuracy: float
    mean_flops: float
    exit_counts: list[int]
    correct: np.ndarray = field(repr=False)
    exits: np.ndarray = field(repr=False)


@dataclass
class _Summary:
    """What calibration compares of an outcome: its thresholds, accuracy, mean FLOPs, and the samples it gets
    wrong that the full cascade gets right (lost) and the reverse (gained)."""
    thresholds: list[float]
    accuracy: float
    mean_flops: float
    lost: int
    gained: int


@dataclass
class CurvePoint:
    """An operating point: an id, the last stage a sample may reach, and what the exits give."""
    id: str
    max_stage: int
    outcome: ExitOutcome


class CascadeScores:
    """Precomputed per-stage confidence and correctness for fast what-if evaluation of thresholds."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray, stage_flops, measure: str = "max_prob"):
        logits = np.asarray(logits)
        if logits.ndim != 3:
            raise ValueError(f"logits must be [stages, samples, classes], got shape {logits.shape}")
        self.conf = confidence(logits, measure)
        self.correct = logits.argmax(-1) == np.asarray(labels)[None, :]
        self.stage_flops = np.asarray(stage_flops, dtype=np.float64)
        if self.stage_flops.shape != (logits.shape[0],):
            raise ValueError(f"need one FLOPs figure per stage ({logits.shape[0]}), got {len(self.stage_flops)}")
        self.cum_flops = np.cumsum(self.stage_flops)
        self.n_stages, self.n = self.conf.shape

    @classmethod
    def _of(cls, conf: np.ndarray, correct: np.ndarray, stage_flops: np.ndarray) -> CascadeScores:
        scores = cls.__new__(cls)
        scores.conf, scores.correct, scores.stage_flops = conf, correct, stage_flops
        scores.cum_flops = np.cumsum(stage_flops)
        scores.n_stages, scores.n = conf.shape
        return scores

    def prefix(self, last: int) -> CascadeScores:
        """The cascade of stages 0..last alone."""
        return self._of(self.conf[:last + 1], self.correct[:last + 1], self.stage_flops[:last + 1])

    def evaluate(self, thresholds, max_stage: int | None = None) -> ExitOutcome:
        """The exits under these thresholds, every sample stopping at max_stage at the latest (default: the final
        stage)."""
        exits = exit_stages(self.conf, thresholds, max_stage)
        correct = self.correct[exits, np.arange(self.n)]
        return ExitOutcome([float(t) for t in thresholds], float(correct.mean()), float(self.cum_flops[exits].mean()),
                           np.bincount(exits, minlength=self.n_stages).tolist(), correct, exits)

    def _candidates(self, stage: int, count: int = 200) -> np.ndarray:
        """About `count` thresholds spread over the stage's confidence quantiles, each half-way between two
        neighbouring observed values: no sample sits on a threshold, so a 1e-7 numeric difference between
        runtimes (PyTorch vs onnxruntime, CPU vs GPU) cannot flip a calibration sample's exit."""
        values = np.unique(self.conf[stage])
        if len(values) < 2:
            return np.array([1.0])
        picks = np.unique(np.linspace(0, len(values) - 2, min(count, len(values) - 1)).round().astype(int))
        mids = (values[picks] + values[picks + 1]) / 2
        return np.unique(np.concatenate([[values[0] / 2], mids, [1.0]]))

    def calibrate(self, *, target_drop: float | None = None, flops_budget: float | None = None, z: float = 0.0,
                  rounds: int = 8) -> ExitOutcome:
        """Per-stage thresholds by coordinate descent over each stage's confidence quantiles.

        target_drop (a fraction, 0.001 = 0.1 pt): minimise mean FLOPs subject to the accuracy drop against the full
        cascade (every stage run) staying within it; with z > 0 the drop is bounded from above by
        (lost - gained + z*sqrt(lost + gained)) / N, a paired normal bound, so a lucky small sample does not pass.
        flops_budget (mean FLOPs per sample): maximise accuracy subject to it.
        """
        if (target_drop is None) == (flops_budget is None):
            raise ValueError("give exactly one of target_drop or flops_budget")
        if self.n_stages == 1:  # a single stage has no exit to choose
            return self.evaluate(np.zeros(0))

        def feasible(o: _Summary) -> bool:
            if target_drop is not None:
                return (o.lost - o.gained + z * np.sqrt(o.lost + o.gained)) / self.n <= target_drop + 1e-12
            return o.mean_flops <= flops_budget * (1 + 1e-9)

        def better(a: _Summary, b: _Summary) -> bool:
            if target_drop is not None:
                return (a.mean_flops, -a.accuracy) < (b.mean_flops, -b.accuracy)
            return (-a.accuracy, a.mean_flops) < (-b.accuracy, b.mean_flops)

        candidates = [self._candidates(s) for s in range(self.n_stages - 1)]
        # Coordinate descent finds a local optimum, so it starts from several policies and keeps the best:
        # nobody exits early, everybody exits at stage 0, and the best single threshold shared by all stages.
        shared = np.unique(np.concatenate(candidates))
        starts = [np.ones(self.n_stages - 1), np.zeros(self.n_stages - 1)]
        pick = self._first_best(self._many(np.repeat(shared[:, None], self.n_stages - 1, axis=1)), None, feasible,
                                better)
        if pick is not None:
            starts.append(np.full(self.n_stages - 1, shared[pick]))
        best = None
        for start in starts:
            o = self._descend(start, candidates, feasible, better, rounds)
            if o is not None and (best is None or better(o, best)):
                best = o
        # Nothing feasible (e.g. a budget below stage 0's cost): the cheapest policy, flagged by its numbers.
        return self.evaluate(best.thresholds) if best is not None else self.evaluate(np.zeros(self.n_stages - 1))

    def _many(self, thresholds: np.ndarray) -> list[_Summary]:
        """What evaluate() gives for each row of thresholds [K, S-1], as summaries, K rows at once (in chunks
        that bound the [K, N] work arrays to a few MiB). Accuracy and mean FLOPs are the same floats evaluate()
        computes (row-wise means sum in the same order)."""
        full = self.correct[-1]
        cols = np.arange(self.n)[None, :]
        out = []
        chunk = max(1, 2_000_000 // max(self.n, 1))
        for lo in range(0, len(thresholds), chunk):
            rows = thresholds[lo:lo + chunk]
            exits = np.full((len(rows), self.n), self.n_stages - 1, dtype=np.int64)
            undecided = np.ones(exits.shape, dtype=bool)
            for s in range(self.n_stages - 1):
                leave = undecided & (self.conf[s][None, :] >= rows[:, s][:, None])
                exits[leave] = s
                undecided &= ~leave
            correct = self.correct[exits, cols]
            accuracy = correct.mean(axis=1)
            flops = self.cum_flops[exits].mean(axis=1)
            lost = (full[None, :] & ~correct).sum(axis=1)
            gained = (~full[None, :] & correct).sum(axis=1)
            out += [_Summary(rows[i].tolist(), float(accuracy[i]), float(flops[i]), int(lost[i]), int(gained[i]))
                    for i in range(len(rows))]
        return out

    @staticmethod
    def _first_best(trials: list[_Summary], best, feasible, better) -> int | None:
        """Index of the trial a sequential scan would end on: each feasible trial better than the best so far
        replaces it (best: a summary to beat, or None)."""
        chosen = None
        for i, o in enumerate(trials):
            if feasible(o) and (best is None or better(o, best)):
                best, chosen = o, i
        return chosen

    def _descend(self, start: np.ndarray, candidates: list[np.ndarray], feasible, better, rounds: int):
        best = self._many(np.asarray(start, dtype=np.float64)[None, :])[0]
        if not feasible(best):
            return None
        thresholds = np.asarray(start, dtype=np.float64).copy()
        for _ in range(rounds):
            improved = False
            for s in range(self.n_stages - 1):
                # Only stage s's threshold moves in this sweep, so every trial is the current policy with one
                # threshold changed and all of them can be scored at once; the scan keeps the sequential order.
                trials = np.repeat(thresholds[None, :], len(candidates[s]), axis=0)
                trials[:, s] = candidates[s]
                scored = self._many(trials)
                pick = self._first_best(scored, best, feasible, better)
                if pick is not None:
                    best, thresholds, improved = scored[pick], trials[pick].copy(), True
            if not improved:
                break
        return best

    def operating_curve(self, default_thresholds, budgets: Sequence[float],
                        budget_ids: Sequence[str]) -> list[CurvePoint]:
        """The accuracy/compute curve, cheapest first: every depth (every sample runs stages 0..m, no early exit;
        "depth-K" runs K stages), the calibrated `default` thresholds, and for each FLOPs budget (mean FLOPs per
        sample; its id from budget_ids) the most accurate thresholds within it over every depth of the cascade.
        A point another point beats on both accuracy and FLOPs is left out, but for the first and last depth and
        the default; points with the same thresholds and depth are one (the default's id, else the first)."""
        last = self.n_stages - 1
        never = [1.0] * last
        found = [CurvePoint("default", last, self.evaluate(default_thresholds))]
        found += [CurvePoint(f"depth-{m + 1}", m, self.evaluate(never, max_stage=m)) for m in range(self.n_stages)]
        for budget, point_id in zip(budgets, budget_ids):
            if not self.cum_flops[0] < budget < self.cum_flops[-1]:
                continue
            best = None
            for m in range(1, self.n_stages):
                chosen = self.prefix(m).calibrate(flops_budget=budget)
                if chosen.mean_flops > budget * (1 + 1e-9):  # nothing within the budget at this depth
                    continue
                thresholds = chosen.thresholds + never[m:]
                o = self.evaluate(thresholds, max_stage=m)
                if best is None or (-o.accuracy, o.mean_flops) < (-best.outcome.accuracy, best.outcome.mean_flops):
                    best = CurvePoint(point_id, m, o)
            if best is not None:
                found.append(best)
        unique, seen = [], set()
        for p in found:
            key = (p.max_stage, tuple(p.outcome.thresholds))
            if key not in seen:
                seen.add(key)
                unique.append(p)
        unique.sort(key=lambda p: (p.outcome.mean_flops, -p.outcome.accuracy))
        kept, best_accuracy = [], -1.0
        for p in unique:
            forced = p.id in ("default", "depth-1", f"depth-{self.n_stages}")
            if forced or p.outcome.accuracy > best_accuracy:
                kept.append(p)
            best_accuracy = max(best_accuracy, p.outcome.accuracy)
        return kept

    def drop_vs_full(self, outcome: ExitOutcome) -> dict:
        full = self.correct[-1]
        lost = int((full & ~outcome.correct).sum())
        gained = int((~full & outcome.correct).sum())
        return {"lost": lost, "gained": gained, "net_samples": lost - gained, "n": self.n}
