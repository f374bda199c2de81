import numpy as np
import pytest

from reskd.exit_policy import CascadeScores, confidence, exit_stages, log_softmax64


def test_confidence_measures():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.exp(2) / (np.exp(2) + 2)
    assert confidence(logits, "max_prob") == pytest.approx([p, 1 / 3])
    assert confidence(logits, "margin") == pytest.approx([p - (1 - p) / 2, 0.0])
    ent = confidence(logits, "entropy")
    assert ent[1] == pytest.approx(0.0, abs=1e-12) and 0 < ent[0] < 1
    with pytest.raises(ValueError, match="unknown exit measure"):
        confidence(logits, "top1")


def test_float64_keeps_confident_samples_apart():
    # In fp32 both saturate to max-probability 1.0; the calibrated thresholds need them ordered.
    logits = np.array([[20.0, 0.0], [30.0, 0.0]], dtype=np.float32)
    fp32 = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)
    assert (fp32.max(-1) / fp32.sum(-1) == 1.0).all()
    conf = confidence(logits, "max_prob")
    assert conf[0] < conf[1] < 1.0
    assert np.allclose(np.exp(log_softmax64(logits)).sum(-1), 1.0)


def test_exit_stages_first_confident_stage_and_last_always_answers():
    conf = np.array([[0.9, 0.2, 0.1, 0.5],
                     [0.1, 0.8, 0.1, 0.95],
                     [0.0, 0.0, 0.0, 0.0]])
    assert exit_stages(conf, [0.5, 0.9]).tolist() == [0, 2, 2, 0]
    assert exit_stages(conf, [0.0, 0.0]).tolist() == [0, 0, 0, 0]
    assert exit_stages(conf, [1.01, 1.01]).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="need 2 thresholds"):
        exit_stages(conf, [0.5])


def _synthetic(n=4000, seed=0):
    """Three stages whose running logits get better; early stages are right when confident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    stages = []
    for quality in (1.0, 2.0, 3.5):
        z = rng.normal(0, 1, (n, 10))
        z[np.arange(n), labels] += quality * rng.uniform(0, 2, n)
        stages.append(z)
    return np.stack(stages), labels


def test_calibration_meets_the_accuracy_target_and_saves_flops():
    logits, labels = _synthetic()
    scores = CascadeScores(logits, labels, [10, 3, 3])
    full = scores.correct[-1].mean()
    chosen = scores.calibrate(target_drop=0.005)
    assert chosen.accuracy >= full - 0.005 - 1e-12
    assert chosen.mean_flops < 16  # cheaper than running every stage
    again = scores.evaluate(chosen.thresholds)
    assert again.accuracy == chosen.accuracy and again.mean_flops == chosen.mean_flops
    assert sum(chosen.exit_counts) == len(labels)
    # A conservative bound never allows more drop than the point estimate.
    strict = scores.calibrate(target_drop=0.005, z=2.0)
    assert strict.mean_flops >= chosen.mean_flops
    d = scores.drop_vs_full(strict)
    assert (d["net_samples"] + 2.0 * np.sqrt(d["lost"] + d["gained"])) / d["n"] <= 0.005 + 1e-12


def test_flops_budget_is_respected():
    logits, labels = _synthetic()
    scores = CascadeScores(logits, labels, [10, 3, 3])
    for budget in (10, 11.5, 13, 16):
        chosen = scores.calibrate(flops_budget=budget)
        assert chosen.mean_flops <= budget + 1e-9
    assert scores.calibrate(flops_budget=16).accuracy >= scores.calibrate(flops_budget=10).accuracy
    with pytest.raises(ValueError, match="exactly one"):
        scores.calibrate()


def test_a_single_stage_has_nothing_to_calibrate():
    logits, labels = _synthetic()
    scores = CascadeScores(logits[:1], labels, [10])
    for chosen in (scores.calibrate(target_drop=0.001), scores.calibrate(flops_budget=5)):
        assert chosen.thresholds == [] and chosen.mean_flops == 10 and chosen.exit_counts == [len(labels)]


def test_the_operating_curve_runs_from_the_first_stage_to_every_stage_each_point_better_than_the_cheaper():
    logits, labels = _synthetic(n=1500)
    scores = CascadeScores(logits, labels, [10, 3, 3])
    default = scores.calibrate(target_drop=0.005)
    budgets = [11.0, 12.0, 13.0, 14.0, 15.0, 40.0]  # 40: dearer than every stage, left to depth-3
    curve = scores.operating_curve(default.thresholds, budgets, [f"b{b:g}" for b in budgets])
    ids = [p.id for p in curve]
    assert ids[0] == "depth-1" and ids[-1] == "depth-3" and "default" in ids and "b40" not in ids
    assert len(set(ids)) == len(ids)
    flops = [p.outcome.mean_flops for p in curve]
    assert flops == sorted(flops)
    for i, p in enumerate(curve):
        again = scores.evaluate(p.outcome.thresholds, max_stage=p.max_stage)
        assert (again.accuracy, again.mean_flops, again.exit_counts) == \
            (p.outcome.accuracy, p.outcome.mean_flops, p.outcome.exit_counts)
        assert again.exit_counts[p.max_stage + 1:] == [0] * (2 - p.max_stage)
        if p.id.startswith("b"):
            assert p.outcome.mean_flops <= float(p.id[1:]) * (1 + 1e-9)
            assert p.outcome.accuracy > max(q.outcome.accuracy for q in curve[:i])  # on the Pareto front
    assert next(p for p in curve if p.id == "default").outcome.thresholds == default.thresholds
    # Every depth is searched: with a dear last stage, stopping after stage 1 is the best use of a small budget.
    dear = CascadeScores(logits, labels, [10, 3, 60])
    curve = dear.operating_curve(dear.calibrate(target_drop=0.005).thresholds, [11.0, 12.0], ["b11", "b12"])
    assert [(p.id, p.max_stage) for p in curve if p.id.startswith("b")] == [("b11", 1), ("b12", 1)]


def one_at_a_time(scores: CascadeScores, *, target_drop=None, flops_budget=None, z=0.0, rounds=8):
    """The calibration's definition, written plainly: every trial policy evaluated on its own (scores.evaluate),
    the same starts, candidates, feasibility and order as CascadeScores.calibrate, which scores a stage's
    candidates together."""
    full = scores.correct[-1]

    def feasible(o):
        if target_drop is not None:
            lost, gained = int((full & ~o.correct).sum()), int((~full & o.correct).sum())
            return (lost - gained + z * np.sqrt(lost + gained)) / scores.n <= target_drop + 1e-12
        return o.mean_flops <= flops_budget * (1 + 1e-9)

    def key(o):
        return (o.mean_flops, -o.accuracy) if target_drop is not None else (-o.accuracy, o.mean_flops)

    k = scores.n_stages - 1
    candidates = [scores._candidates(s) for s in range(k)]
    starts = [np.ones(k), np.zeros(k)]
    shared = None
    for t in np.unique(np.concatenate(candidates)):
        o = scores.evaluate(np.full(k, t))
        if feasible(o) and (shared is None or key(o) < key(shared)):
            shared = o
    if shared is not None:
        starts.append(np.asarray(shared.thresholds))
    best = None
    for start in starts:
        here = scores.evaluate(start)
        if not feasible(here):
            continue
        thresholds = start.copy()
        for _ in range(rounds):
            improved = False
            for s in range(k):
                for t in candidates[s]:
                    trial = thresholds.copy()
                    trial[s] = t
                    o = scores.evaluate(trial)
                    if feasible(o) and key(o) < key(here):
                        here, thresholds, improved = o, trial, True
            if not improved:
                break
        if best is None or key(here) < key(best):
            best = here
    return best if best is not None else scores.evaluate(np.zeros(k))


@pytest.mark.parametrize("seed", range(6))
def test_calibration_picks_what_evaluating_each_trial_alone_picks(seed):
    """Scoring a stage's candidate thresholds together must not change the choice, ties included (rounded
    logits give many equal confidences), for accuracy targets with and without the paired bound and for budgets."""
    rng = np.random.default_rng(seed)
    n_stages, n = int(rng.integers(2, 5)), int(rng.integers(20, 800))
    logits = np.cumsum(rng.normal(0, rng.uniform(0.5, 4), (n_stages, n, 10)), axis=0).astype(np.float32)
    if seed % 2:
        logits = np.round(logits, 1)
    flops = rng.uniform(1, 100, n_stages)
    scores = CascadeScores(logits, rng.integers(0, 10, n), flops)
    for kw in (dict(target_drop=0.0), dict(target_drop=0.005, z=1.64), dict(flops_budget=flops[0] * 1.2),
               dict(flops_budget=flops.sum() * 0.5), dict(flops_budget=flops[0] * 0.5)):
        fast, plain = scores.calibrate(**kw), one_at_a_time(scores, **kw)
        assert (fast.thresholds, fast.accuracy, fast.mean_flops, fast.exit_counts) == \
               (plain.thresholds, plain.accuracy, plain.mean_flops, plain.exit_counts), kw
