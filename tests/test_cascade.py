"""The cascade step (reskd.cascade) is the only code that turns stage outputs into running logits, confidence and
exits: stepping through it sample set by sample set gives exactly what calibration's what-if evaluation
(reskd.exit_policy) assumes, with per-sample settings and across merged batches."""

from __future__ import annotations

import numpy as np
import pytest

from reskd.cascade import CascadeSamples, ExitRule, advance, cascade_step, running_logits
from reskd.exit_policy import CascadeScores, confidence, exit_stages


def outputs(seed=0, stages=3, n=400, classes=10):
    rng = np.random.default_rng(seed)
    return (rng.normal(scale=3.0, size=(stages, n, classes))).astype(np.float32)


def step_through(rule, stage_outputs, samples, early_exit=True):
    """What the runtime does: each stage on the samples still running."""
    active = np.arange(len(samples))
    for s in range(rule.num_stages):
        if len(active) == 0:
            break
        (leave,) = advance(rule, s, [(samples, active)], stage_outputs[s][active], early_exit)
        active = active[~leave]
    return samples.result(np.cumsum([5, 1, 1]))


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
def test_stepping_exits_where_calibration_says(measure):
    out = outputs()
    thresholds = np.array([0.8, 0.6])
    rule = ExitRule(measure, 3)
    n = out.shape[1]
    got = step_through(rule, out, CascadeSamples(np.tile(thresholds, (n, 1)), np.full(n, 2, np.int32), 10))
    running = running_logits(out)
    want = exit_stages(confidence(running, measure), thresholds)
    np.testing.assert_array_equal(got.exit_stage, want)
    assert len(set(want.tolist())) == 3  # the case exercises every stage
    np.testing.assert_array_equal(got.logits, running[want, np.arange(n)].astype(np.float32))
    scores = CascadeScores(running, np.zeros(n, np.int64), [5, 1, 1], measure)
    assert got.flops.mean() == pytest.approx(scores.evaluate(thresholds).mean_flops)


def test_per_sample_settings_and_merged_batches_change_nothing():
    """Samples of two request-like sets, with their own thresholds and last stages, stepped together in merged
    batches, end exactly as each set stepped alone."""
    out = outputs(1, n=60)
    rule = ExitRule("max_prob", 3)
    rng = np.random.default_rng(2)

    def settings(rows):
        return rng.uniform(0.3, 0.99, (len(rows), 2)), rng.integers(0, 3, len(rows)).astype(np.int32)

    a_rows, b_rows = np.arange(0, 25), np.arange(25, 60)
    (ta, la), (tb, lb) = settings(a_rows), settings(b_rows)
    alone = [step_through(rule, out[:, rows], CascadeSamples(t, l, 10)) for rows, t, l in
             ((a_rows, ta, la), (b_rows, tb, lb))]
    a, b = CascadeSamples(ta, la, 10), CascadeSamples(tb, lb, 10)
    active = [(a, np.arange(len(a_rows))), (b, np.arange(len(b_rows)))]
    for s in range(3):
        logits = np.concatenate([out[s][rows][idx] for rows, (_, idx) in zip((a_rows, b_rows), active)])
        masks = advance(rule, s, active, logits)
        active = [(samples, idx[~m]) for (samples, idx), m in zip(active, masks)]
    for merged, single in zip((a.result(np.cumsum([5, 1, 1])), b.result(np.cumsum([5, 1, 1]))), alone):
        np.testing.assert_array_equal(merged.exit_stage, single.exit_stage)
        np.testing.assert_array_equal(merged.logits, single.logits)
        np.testing.assert_array_equal(merged.confidence, single.confidence)
    assert (a.exit_stage <= la).all() and (b.exit_stage <= lb).all()  # nobody runs past its max_stage


def test_without_early_exit_only_the_last_stage_decides():
    out = outputs(3, n=50)
    n = out.shape[1]
    last = np.full(n, 1, np.int32)
    step = cascade_step(ExitRule("max_prob", 3), 0, np.zeros((n, 10)), out[0], np.zeros((n, 2)), last,
                        early_exit=False)
    assert not step.leave.any()  # threshold 0 would have let everyone leave
    step = cascade_step(ExitRule("max_prob", 3), 1, step.running, out[1], np.zeros((n, 2)), last, early_exit=False)
    assert step.leave.all()
    np.testing.assert_array_equal(step.running, running_logits(out)[1])
