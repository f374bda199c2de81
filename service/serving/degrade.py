"""Degrade, don't refuse: under load a version moves down its accuracy/compute curve, and back up when the load
has passed (RESKD_DEGRADE).

A version's *ladder* is what it may run at: its default (calibrated) operating point, the *top*, then the
manifest's cheaper points down to RESKD_DEGRADE_MAX_DROP_PT below the top's validation accuracy, each cheaper and
less accurate than the one before. Each point's cost per image is predicted from what is measured live:

    cost(p) = fixed + sum over stages s of reach_s(p) * stage_s

reach_s(p): the share of images that run stage s at p (the manifest's validation exit fractions); stage_s: the
seconds one sample of stage s costs, measured on the batches the scheduler runs (CPU seconds of the inference
thread on a CPU, wall seconds on a GPU); fixed: what an image costs besides its stages (HTTP, parsing, decoding,
responses), measured as the process's CPU time not spent in stages, per image answered. On a CPU everything shares
the cores, so the costs add; on a GPU the host work and the device work overlap, so the larger of the two bounds
the rate. The scheduler's workload measures its busy rate in *top-point images* (every request weighted by its
point's cost relative to the top's), so a point's predicted rate is that measured rate over its relative cost.

The controller (one per version and worker process) picks the most accurate point whose predicted rate carries
the arriving images (admitted and refused) with 5% to spare. It moves down at once when the expected queue wait
passes half the latency objective (RESKD_LATENCY_SLO_MS) while the arrivals exceed what the current point carries,
and back up only after the wait has stayed at most half of it and the arrivals have fitted a dearer point for
RESKD_DEGRADE_HOLD_S (Controller.update says exactly how). Rates are compared with the version's capacity: its rate
measured while every worker was busy. A point that would not raise the rate by 10% over the top's is no option: requests
bound by HTTP and decoding are shed as before (503), which stays the last resort below the cheapest point.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Callable

from reskd.manifest import Manifest

HEADROOM = 0.95  # a point carries the arrivals when they are at most this share of its predicted rate
BURST_S = 0.25  # a move down is sized on the arrivals of the last BURST_S seconds when they are higher (a step)
MIN_GAIN = 1.10  # a cheaper point is an option only if it raises the predicted rate this much over the top's
DOWN_AT = 0.5  # of the objective: an expected wait above this moves down at once (if the load is the cause)
UP_BELOW = 0.5  # of the objective: the wait stays at most this for the hold time before moving up
OVERLOAD = 1.05  # the load is the cause: arrivals over OVERLOAD_S above this share of what the current point carries
OVERLOAD_S = 4.0  # (long enough that Poisson noise at a load the point carries rarely passes it; a step does at once)


@dataclass(frozen=True)
class Point:
    """An operating point of a version, as its manifest measured it on the validation split (a rung of its ladder,
    or the point a request ran at)."""
    id: str
    accuracy: float
    mean_flops: float
    exit_fractions: tuple[float, ...]  # share of images leaving at each stage

    @property
    def reach(self) -> tuple[float, ...]:
        """Share of images that run each stage."""
        return tuple(sum(self.exit_fractions[s:]) for s in range(len(self.exit_fractions)))

    @classmethod
    def of(cls, manifest: Manifest, point_id: str = "default") -> Point | None:
        """One of the manifest's operating points; "default" also for a version without stored points (from its
        calibration section). None where the manifest has no validation figures for it."""
        points = manifest.operating_points
        if points is not None:
            p = points.point(points.default if point_id == "default" else point_id)
            return cls(p.id, p.accuracy, p.mean_flops, tuple(p.exit_fractions))
        cal = manifest.calibration
        if point_id != "default":
            return None
        if cal is not None and cal.n > 0 and len(cal.exit_counts) == len(manifest.stages):
            return cls("default", cal.accuracy, cal.mean_flops, tuple(c / cal.n for c in cal.exit_counts))
        return None  # e.g. a one-stage version: no validation figures in its manifest


def ladder(manifest: Manifest, max_drop_pt: float) -> list[Point]:
    """The points a version may run at, the top (its default point) first, then cheaper and less accurate ones
    down to max_drop_pt below the top's validation accuracy. Empty for a version without stored operating points
    (it is never degraded: shed-only)."""
    points = manifest.operating_points
    if points is None:
        return []
    top = points.point(points.default)
    rungs = [Point.of(manifest, top.id)]
    below = [p for p in points.points if p.id != top.id and p.mean_flops < top.mean_flops
             and p.accuracy < top.accuracy and 100 * (top.accuracy - p.accuracy) <= max_drop_pt + 1e-9]
    for p in sorted(below, key=lambda p: (-p.accuracy, p.mean_flops)):
        if p.mean_flops < rungs[-1].mean_flops:  # cheaper than every more accurate rung
            rungs.append(Point.of(manifest, p.id))
    return rungs


@dataclass
class Costs:
    """What one image costs: `stage` seconds per sample of each stage, `fixed` seconds per image besides its stages.
    shared: the stages and the rest use the same cores (CPU), so they add; else they overlap (GPU)."""
    stage: list[float]
    fixed: float = 0.0
    shared: bool = True

    def per_image(self, point: Point) -> float:
        compute = sum(r * c for r, c in zip(point.reach, self.stage))
        return self.fixed + compute if self.shared else max(self.fixed, compute)


def weights(rungs: list[Point], costs: Costs) -> list[float]:
    """Each point's cost per image relative to the top's (1.0 for the top)."""
    top = costs.per_image(rungs[0])
    return [costs.per_image(p) / top if top > 0 else 1.0 for p in rungs]


def choose(capacity: float, weights: list[float], arrival: float, backlog: float = 0.0, drain_s: float = 1.0,
           headroom: float = HEADROOM, min_gain: float = MIN_GAIN) -> int:
    """The point to run at. capacity: the version's measured rate in top-point images per second; weights: each
    point's cost per image relative to the top's (the top first), so point i answers capacity / weights[i] images/s;
    arrival: images offered per second; backlog: the work admitted and not yet answered (top-point images), to be
    done within drain_s besides the arrivals (its cost is fixed already: only new requests get cheaper). -> the most
    accurate point whose rate carries the arrivals and the backlog with headroom; if none does, the cheapest. A
    point not min_gain times faster than the top is no option (cheaper compute would not answer more: shed)."""
    options = [i for i, w in enumerate(weights) if i == 0 or w * min_gain <= weights[0]]
    spare = headroom * capacity - backlog / drain_s
    for i in options:
        if arrival * weights[i] <= spare:
            return i
    return options[-1]


class Arrivals:
    """Images offered (admitted or refused) per second, over the last `window` seconds or any span up to `keep`.
    O(1) to add and O(log n) to read (cumulative sums, searched by time): it is read at every admission."""

    def __init__(self, window: float = 2.0, keep: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.window, self.keep, self.clock = window, max(keep, window), clock
        self._times: list[float] = []
        self._sums: list[float] = []  # images offered up to and including each event
        self._first = 0  # events before it are older than `keep`
        self._start = clock()

    def add(self, images: float) -> None:
        self._times.append(self.clock())
        self._sums.append((self._sums[-1] if self._sums else 0.0) + images)

    def rate(self, over: float | None = None) -> float:
        """Over the last `over` seconds (default the window)."""
        now, over = self.clock(), over or self.window
        self._first = bisect.bisect_left(self._times, now - self.keep, self._first)
        if self._first > 4096 and self._first > len(self._times) // 2:  # drop what no span reaches any more
            del self._times[:self._first], self._sums[:self._first]
            self._first = 0
        i = bisect.bisect_left(self._times, now - over, self._first)
        total = 0.0 if i >= len(self._times) else self._sums[-1] - (self._sums[i - 1] if i > 0 else 0.0)
        return total / min(over, max(now - self._start, 1e-3))


class HostMeter:
    """The process's CPU time not spent in stages, per image answered: the fixed cost of an image (HTTP, parsing,
    decoding, responses). One per process: every version's stage time and answers count here."""

    PERIOD = 0.25  # seconds between readings

    def __init__(self, cpu: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.perf_counter):
        self.cpu, self.clock = cpu, clock
        self.stage_seconds = 0.0
        self.images = 0
        self._last = (clock(), cpu(), 0.0, 0)
        self.fixed: float | None = None

    def reading(self) -> float | None:
        """The fixed cost per image (an average over recent readings), None before any image was answered."""
        now = self.clock()
        t, cpu, stage, images = self._last
        if now - t >= self.PERIOD and self.images - images > 0:
            spent = self.cpu()
            per_image = max(0.0, (spent - cpu) - (self.stage_seconds - stage)) / (self.images - images)
            self.fixed = per_image if self.fixed is None else 0.7 * self.fixed + 0.3 * per_image
            self._last = (now, spent, self.stage_seconds, self.images)
        elif now - t >= self.PERIOD:
            self._last = (now, self.cpu(), self.stage_seconds, self.images)
        return self.fixed


HOST = HostMeter()


@dataclass
class StageCosts:
    """Seconds per sample of each stage, an average over recent batches weighted by their samples. Seeded from
    the stages' FLOPs until a stage has run; a stage not run yet is priced at the FLOPs rate of those that have."""
    flops: list[float]
    _seconds: list[float] = field(default_factory=list)
    _samples: list[float] = field(default_factory=list)

    def __post_init__(self):
        self._seconds = [0.0] * len(self.flops)
        self._samples = [0.0] * len(self.flops)

    def ran(self, stage: int, samples: int, seconds: float) -> None:
        self._seconds[stage] = 0.9 * self._seconds[stage] + seconds
        self._samples[stage] = 0.9 * self._samples[stage] + samples

    def per_sample(self) -> list[float]:
        measured = [(s / n, f) for s, n, f in zip(self._seconds, self._samples, self.flops) if n > 0]
        per_flop = sum(s for s, _ in measured) / sum(f for _, f in measured) if measured else 1e-12
        return [s / n if n > 0 else per_flop * f for s, n, f in zip(self._seconds, self._samples, self.flops)]


class Controller:
    """A version's degrade controller in one process. `update` is called as requests arrive; `current` is the rung
    new requests run at (0: the top)."""

    def __init__(self, rungs: list[Point], stage_flops: list[float], *, slo_s: float, hold_s: float,
                 shared: bool = True, host: HostMeter = HOST, clock: Callable[[], float] = time.perf_counter,
                 on_switch: Callable[[int, int], None] | None = None):
        self.rungs = rungs
        self.slo_s, self.hold_s = slo_s, hold_s
        self.shared = shared
        self.host = host
        self.clock = clock
        self.stages = StageCosts(list(map(float, stage_flops)))
        self.arrivals = Arrivals(keep=max(hold_s, OVERLOAD_S), clock=clock)
        self.current = 0
        self.on_switch = on_switch or (lambda before, after: None)
        self._low_since: float | None = None
        self.weights = [1.0] * len(rungs)

    @property
    def point(self) -> Point:
        return self.rungs[self.current]

    def costs(self) -> Costs:
        return Costs(self.stages.per_sample(), self.host.reading() or 0.0, self.shared)

    def update(self, rate: float | None, wait: float | None, capacity: float | None = None) -> int:
        """rate: the version's measured busy rate in top-point images/s (None before it is known); wait: the
        expected queue wait in seconds (None when unknown); capacity: its rate while every worker was busy (the
        rate it can carry; default `rate`). -> the rung to run new requests at.

        Down, at once: the wait has passed half the objective and the arrivals of the last OVERLOAD_S exceed what
        the current point carries by 5%: to the most accurate point that carries them (over the window, or over the
        last BURST_S when higher: a step up in load is met in one move) and the work queued beyond half the
        objective within one objective. Up: once the wait has stayed at most half the objective and the arrivals
        have fitted a dearer point for the hold time, to the most accurate point the arrivals of the last half hold
        fit."""
        self.weights = weights(self.rungs, self.costs())
        if rate is None or len(self.rungs) < 2:
            return self.current
        capacity = capacity or rate
        now = self.clock()
        arrival = self.arrivals.rate()
        overloaded = self.arrivals.rate(OVERLOAD_S) * self.weights[self.current] > OVERLOAD * capacity
        if wait is not None and wait > DOWN_AT * self.slo_s and overloaded:
            backlog = (wait - DOWN_AT * self.slo_s) * rate
            burst = max(arrival, self.arrivals.rate(BURST_S))
            target = choose(capacity, self.weights, burst, backlog, self.slo_s)
            if target > self.current:
                self._switch(target)
            return self.current
        if self.current > 0 and (wait is None or wait <= UP_BELOW * self.slo_s) \
                and choose(capacity, self.weights, arrival) < self.current:
            if self._low_since is None:
                self._low_since = now
            elif now - self._low_since >= self.hold_s:
                settled = self.arrivals.rate(max(self.hold_s / 2, self.arrivals.window))
                self._switch(min(self.current, choose(capacity, self.weights, settled)))
        else:
            self._low_since = None
        return self.current

    def _switch(self, to: int) -> None:
        before, self.current, self._low_since = self.current, to, None
        if to != before:
            self.on_switch(before, to)
