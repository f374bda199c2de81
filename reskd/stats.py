"""Intervals (numpy only): paired bootstrap intervals for accuracy and accuracy differences (the training report and
the manifest's operating points use the same resampling), and the Wilson score interval of a proportion (the audit's
agreement and out-of-distribution share, in `reskd score` and the benchmarks)."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n (95% by default), as fractions; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


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
