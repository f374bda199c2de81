"""Paired bootstrap intervals for accuracy and accuracy differences (numpy only): the training report and the
manifest's operating points use the same resampling."""

from __future__ import annotations

import numpy as np


class Bootstrap:
    """Paired percentile bootstrap over a split's samples: one set of resampling indices shared by every statistic;
    intervals in points (percent)."""

    def __init__(self, n: int, samples: int, seed: int = 0):
        self.idx = np.random.default_rng(seed).integers(0, n, size=(samples, n), dtype=np.int32)

    def interval(self, correct: np.ndarray, minus: np.ndarray | None = None) -> list[float]:
        stat = correct.astype(np.float32)
        if minus is not None:
            stat = stat - minus.astype(np.float32)
        means = np.empty(len(self.idx))
        for i in range(0, len(self.idx), 100):  # chunks keep memory flat on ImageNet-size test sets
            means[i:i + 100] = stat[self.idx[i:i + 100]].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return [round(float(lo) * 100, 3), round(float(hi) * 100, 3)]
