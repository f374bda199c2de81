"""Prometheus metrics. The names and labels are a contract (docs/design.md, "Metrics"): dashboards and alerts are
written against them (deploy/; tests/test_deploy_files.py checks every name they use exists here). Every series
carries `model` and `version` but the process-wide reskd_ready and connection series; "% of teacher compute" is
rate(reskd_flops_total[5m]) / rate(reskd_teacher_flops_total[5m]).

Metrics owns the registry and the HTTP-level series; ModelMetrics holds one model version's series, resolved once,
and is what that version's scheduler reports to (its SchedulerObserver). What describes the served versions
(reskd_model_info, the calibration references, reskd_model_refused) is read from the routing table at each scrape
(ModelStateCollector), so it can never disagree with what is served.

Several worker processes (RESKD_WORKERS, service/supervisor.py) share one metrics folder (prometheus_client's
multiprocess mode, PROMETHEUS_MULTIPROC_DIR set by the supervisor): counters and histograms are summed over every
worker that ever ran (a restarted worker's counts are kept, so rates never see a reset), queue depths, in-flight
requests and connections over the live ones, reskd_ready is their minimum (1 only when every worker is ready), and
any worker's /metrics shows the whole server. Model control keeps the workers' routing tables equal, so the
answering worker's ModelStateCollector speaks for all of them; model-load counts come from worker 0 alone.

Besides what is measured, each version exposes what its calibration on the validation split expects
(reskd_calibrated_compute_fraction, reskd_calibrated_exit_fraction): the references the alert rules in
deploy/prometheus compare the served figures against."""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from reskd.cascade import EXIT_REASONS, CascadeResult
from reskd.manifest import Manifest

from .audit import DROP_REASONS
from .degrade import Point

# Why the server closed a connection (service/rest/connections.py): the `reason` label of
# reskd_connections_closed_total, every value present from the start.
REASONS = ("idle", "header_timeout", "body_timeout", "evicted", "refused")

# The *_created companion series only clutter a scrape; rates do not need them.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Exit confidence lies in [0, 1] for every measure (max_prob in [1/classes, 1]). A calibrated cascade lets most
# samples leave early at high confidence, so the top of the range gets the finest buckets: drift shows there first.
CONFIDENCE_BUCKETS = (.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .98, .99, .995, .999, .9999)
M = ("model", "version")


class Metrics:
    """One registry per app, so several servers (tests) never share counters. Under a multiprocess folder (a worker
    of several) the values live in that folder and the exposition reads every worker's."""

    def __init__(self, worker: int = 0) -> None:
        self.worker = str(worker)  # the `worker` label of the per-worker series (0 in a single process)
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.state: ModelStateCollector | None = None
        r = self.registry = CollectorRegistry()
        self.requests = Counter("reskd_requests_total", "HTTP requests and gRPC calls answered (a call: its "
                                "method's path and the HTTP status of its outcome)", [*M, "endpoint", "code"],
                                registry=r)
        self.request_duration = Histogram("reskd_request_duration_seconds", "time from request to response",
                                          [*M, "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("reskd_images_total", "images classified", M, registry=r)
        self.exits = Counter("reskd_exits_total", "images that exited at each stage", [*M, "stage"], registry=r)
        self.flops = Counter("reskd_flops_total", "useful FLOPs: the stages each image ran (2 x MACs)", M,
                             registry=r)
        self.teacher_flops = Counter("reskd_teacher_flops_total", "FLOPs the teacher would have spent on the "
                                     "same images", M, registry=r)
        self.flops_saved = Counter("reskd_flops_saved_total", "FLOPs not spent, against the teacher or the full "
                                   "cascade (an image costing more than the baseline adds 0)", [*M, "baseline"],
                                   registry=r)
        self.batch_size = Histogram("reskd_batch_size", "samples per executed stage batch", [*M, "stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_duration = Histogram("reskd_queue_duration_seconds", "time an image waited before its stage "
                                        "batch ran", [*M, "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("reskd_stage_duration_seconds", "time one stage took on one batch",
                                        [*M, "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.padding_flops = Counter("reskd_padding_flops_total", "FLOPs spent on padding rows (batch buckets)",
                                     [*M, "stage"], registry=r)
        self.queue_depth = Gauge("reskd_queue_depth", "images waiting for a stage", [*M, "stage"], registry=r,
                                 multiprocess_mode="livesum")
        self.inflight = Gauge("reskd_inflight_requests", "requests being served", M, registry=r,
                              multiprocess_mode="livesum")
        self.exit_confidence = Histogram("reskd_exit_confidence", "confidence (the manifest's exit measure) of "
                                         "each image at the stage it left", [*M, "stage"],
                                         buckets=CONFIDENCE_BUCKETS, registry=r)
        self.dropped_images = Counter("reskd_dropped_images_total", "images not classified because their client "
                                      "went away first (the request counts as code 499)", M, registry=r)
        # Why images left, and the operating points they ran at (service/serving/degrade.py): what the server
        # answered against what validation measured for those points.
        self.exit_reasons = Counter("reskd_exit_reasons_total", "images by why they left: confident, final, "
                                    "max_stage, load (a cheaper point the server chose under load) or deadline",
                                    [*M, "reason"], registry=r)
        self.point_images = Counter("reskd_point_images_total", "images answered, by the operating point they ran "
                                    "at (custom: the client's own threshold or max_stage)", [*M, "point"],
                                    registry=r)
        self.expected_images = Counter("reskd_expected_images_total", "images answered at an operating point the "
                                       "manifest has validation figures for (the expected_* series' count)", M,
                                       registry=r)
        self.expected_correct = Counter("reskd_expected_correct_total", "sum over those images of their point's "
                                        "validation accuracy: / reskd_expected_images_total = the expected "
                                        "accuracy served", M, registry=r)
        self.expected_flops = Counter("reskd_expected_flops_total", "sum over those images of their point's "
                                      "validation mean FLOPs", M, registry=r)
        self.expected_exits = Counter("reskd_expected_exits_total", "sum over those images of their point's "
                                      "validation exit fraction at each stage", [*M, "stage"], registry=r)
        self.operating_point = Gauge("reskd_operating_point", "1 for the operating point requests that leave their "
                                     "exit settings to the server run at, in each worker process; 0 for the "
                                     "version's other points", [*M, "worker", "point"], registry=r,
                                     multiprocess_mode="livesum")
        self.degrade_level = Gauge("reskd_degrade_level", "rungs below the top (default) point that point is, in "
                                   "each worker process (0: not degraded)", [*M, "worker"], registry=r,
                                   multiprocess_mode="livesum")
        self.point_switches = Counter("reskd_point_switches_total", "changes of that point, down (under load) or "
                                      "up", [*M, "direction"], registry=r)
        self.expected_confidence = Counter("reskd_expected_exit_confidence_total", "sum over the images of "
                                           "reskd_expected_images_total of their point's validation mean exit "
                                           "confidence: the reference of reskd_exit_confidence's mean", M,
                                           registry=r)
        # The shadow audit (service/serving/audit.py) and the drift signal: answers given early, re-run through the
        # audit model (the teacher), against what validation measured.
        self.audit_images = Counter("reskd_audit_images_total", "answers given before the last stage that were "
                                    "re-run through the version's audit model", [*M, "stage"], registry=r)
        self.audit_agreements = Counter("reskd_audit_agreements_total", "audited answers whose class equals the "
                                        "audit model's", [*M, "stage"], registry=r)
        self.audit_expected = Counter("reskd_audit_expected_agreements_total", "sum over the audited answers of the "
                                      "agreement validation measured for each (its operating point at its exit "
                                      "stage): / reskd_audit_images_total = the reference", [*M, "stage"],
                                      registry=r)
        self.audit_dropped = Counter("reskd_audit_dropped_total", "answers picked for the audit and not audited: "
                                     "budget (RESKD_AUDIT_MAX_COMPUTE_PCT), busy (no spare capacity), unloaded (the "
                                     "audit model is not served: the audit pauses), no_reference (the client's own "
                                     "exit settings), failed", [*M, "reason"], registry=r)
        self.ood_images = Counter("reskd_ood_images_total", "images whose stage-0 energy score is above the "
                                  "validation 99th percentile the manifest stores (compare with "
                                  "reskd_calibrated_ood_fraction)", M, registry=r)
        # The statistics extension's figures (service/serving/statistics.py): inference requests by outcome, and the
        # time spent turning a request into images (reading, parsing, decoding) and results into a response.
        self.inference_requests = Summary("reskd_inference_request_seconds", "inference requests (v1 classify, v2 "
                                          "infer) by outcome (success: 200; fail: any other status), from request "
                                          "to response", [*M, "outcome"], registry=r)
        self.request_phase = Summary("reskd_request_phase_seconds", "time an inference request spent reading, "
                                     "parsing and decoding its images (input) and encoding its response (output)",
                                     [*M, "phase"], registry=r)
        self.last_inference = Gauge("reskd_last_inference_timestamp_seconds", "when the version last answered a "
                                    "request (Unix time)", M, registry=r, multiprocess_mode="max")
        # Model control (service/serving/control.py): every load of a version.
        self.model_loads = Counter("reskd_model_loads_total", "model versions loaded, refused (verification or "
                                   "warm-up failed; the version served before goes on) or unloaded",
                                   [*M, "result"], registry=r)
        # Process-wide, without model labels: a server whose loading failed has no model series, and connections
        # belong to no model.
        self.ready = Gauge("reskd_ready", "1 when GET /v2/health/ready answers 200 (every model loaded and "
                           "warmed, not shutting down; with several workers, on every one), else 0", registry=r,
                           multiprocess_mode="livemin")
        self.connections = Gauge("reskd_open_connections", "HTTP connections open", registry=r,
                                 multiprocess_mode="livesum")
        self.connections_closed = Counter("reskd_connections_closed_total", "connections the server closed or "
                                          "refused, by reason (service/rest/connections.py)", ["reason"], registry=r)
        for reason in REASONS:
            self.connections_closed.labels(reason)

    def for_model(self, model: str, version: int, manifest: Manifest) -> ModelMetrics:
        return ModelMetrics(self, model, version, manifest)

    def describe_models(self, live: Callable[[], Iterable[tuple[str, int, Manifest, bool]]],
                        refused: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Where the series describing the versions come from at each scrape: live() -> (model, version, manifest,
        routed) for each version served or still draining; refused() -> the refused (model, version)s."""
        self.state = ModelStateCollector(live, refused)
        self.registry.register(self.state)

    def version_gone(self, model: str, version: int, stages: int) -> None:
        """A version no longer served or draining: its gauges go; its counters stay, as counters do. (In a
        worker the gauges stay in the shared folder; the exposition leaves out versions no longer live.)"""
        if self.multiprocess_dir:
            return
        v = str(version)
        try:
            self.inflight.remove(model, v)
        except KeyError:
            pass
        for stage in range(stages):
            try:
                self.queue_depth.remove(model, v, str(stage))
            except KeyError:
                pass
        for labels in list(self.operating_point._metrics):
            if labels[:2] == (model, v):
                self.operating_point.remove(*labels)
        try:
            self.degrade_level.remove(model, v, self.worker)
        except KeyError:
            pass

    def families(self):
        """The metric families as the exposition shows them: this process's, or with several workers every
        worker's, summed (service/serving/statistics.py reads the statistics extension from them)."""
        if not self.multiprocess_dir:
            return self.registry.collect()
        return MultiProcessCollector(None, self.multiprocess_dir).collect()

    def exposition(self) -> bytes:
        if not self.multiprocess_dir:
            return prometheus_client.generate_latest(self.registry)
        registry = CollectorRegistry()
        live = self.state.live_keys() if self.state else set()
        registry.register(_LiveVersionsOnly(MultiProcessCollector(None, self.multiprocess_dir), live))
        if self.state is not None:
            registry.register(self.state)
        return prometheus_client.generate_latest(registry)


# Per-version gauges a worker cannot remove from the shared folder: the exposition shows them for live versions only.
_VERSION_GAUGES = {"reskd_queue_depth", "reskd_inflight_requests", "reskd_operating_point", "reskd_degrade_level"}


class _LiveVersionsOnly:
    def __init__(self, collector: MultiProcessCollector, live: set[tuple[str, str]]):
        self.collector, self.live = collector, live

    def collect(self):
        for family in self.collector.collect():
            if family.name in _VERSION_GAUGES:
                family.samples = [s for s in family.samples
                                  if (s.labels.get("model"), s.labels.get("version")) in self.live]
            yield family


class ModelStateCollector:
    """reskd_model_info, reskd_calibrated_compute_fraction, reskd_calibrated_exit_fraction and
    reskd_model_refused, computed from the routing table at each scrape."""

    def __init__(self, live: Callable[[], Iterable[tuple[str, int, Manifest, bool]]],
                 refused: Callable[[], Iterable[tuple[str, int]]]):
        self.live, self.refused = live, refused

    def live_keys(self) -> set[tuple[str, str]]:
        return {(name, str(version)) for name, version, _, _ in self.live()}

    def describe(self):
        return list(self._families())

    def collect(self):
        families = self._families()
        info, compute, exits, refused, agreement, ood = families
        for name, version, manifest, routed in self.live():
            v = str(version)
            if routed:
                info.add_metric([name, v, str(len(manifest.stages))], 1)
            expected = calibrated_expectation(manifest)
            if expected is not None:
                compute.add_metric([name, v], expected[0])
                for stage, fraction in enumerate(expected[1]):
                    exits.add_metric([name, v, str(stage)], fraction)
            if manifest.audit is not None:
                default = manifest.operating_points.default if manifest.operating_points else "default"
                for stage, value in enumerate(manifest.audit.points.get(default, [])):
                    if value is not None and stage < len(manifest.stages) - 1:
                        agreement.add_metric([name, v, str(stage)], value)
            if manifest.drift is not None:
                ood.add_metric([name, v], manifest.drift.above_p99)
        for name, version in self.refused():
            refused.add_metric([name, str(version)], 1)
        return list(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("reskd_model_info", "a served model version (value 1)", labels=[*M, "stages"]),
            GaugeMetricFamily("reskd_calibrated_compute_fraction", "mean FLOPs per image / teacher FLOPs under the "
                              "calibrated thresholds, measured on the validation split", labels=M),
            GaugeMetricFamily("reskd_calibrated_exit_fraction", "share of validation images that left at each "
                              "stage under the calibrated thresholds", labels=[*M, "stage"]),
            GaugeMetricFamily("reskd_model_refused", "1 while a version in the repository is refused (the reason "
                              "is in the log and GET/POST /v2/repository/index)", labels=M),
            GaugeMetricFamily("reskd_audit_reference_agreement", "share of validation answers given at each stage "
                              "before the last, at the default operating point, that agreed with the audit model",
                              labels=[*M, "stage"]),
            GaugeMetricFamily("reskd_calibrated_ood_fraction", "share of validation images whose stage-0 energy "
                              "score is above its validation 99th percentile (the reference of "
                              "reskd_ood_images_total / reskd_images_total)", labels=M),
        )


class ModelMetrics:
    """One model version's series. Creating it creates every series up front, so a fresh server already exposes
    zeros (rate() needs them)."""

    def __init__(self, metrics: Metrics, model: str, version: int, manifest: Manifest):
        m, v = metrics, str(version)
        stages = [str(s) for s in range(len(manifest.stages))]
        self.stage_flops = np.asarray(manifest.stage_flops, dtype=np.int64)
        self.teacher_flops = int(manifest.teacher.flops)
        self.cascade_flops = int(self.stage_flops.sum())
        self.inflight = m.inflight.labels(model, v)
        self._images = m.images.labels(model, v)
        self._flops = m.flops.labels(model, v)
        self._teacher_flops = m.teacher_flops.labels(model, v)
        self._saved_vs_teacher = m.flops_saved.labels(model, v, "teacher")
        self._saved_vs_cascade = m.flops_saved.labels(model, v, "cascade")
        self._exits = [m.exits.labels(model, v, s) for s in stages]
        self._batch_size = [m.batch_size.labels(model, v, s) for s in stages]
        self._stage_duration = [m.stage_duration.labels(model, v, s) for s in stages]
        self._queue_duration = [m.queue_duration.labels(model, v, s) for s in stages]
        self._padding = [m.padding_flops.labels(model, v, s) for s in stages]
        self._queue_depth = [m.queue_depth.labels(model, v, s) for s in stages]
        self._confidence = [m.exit_confidence.labels(model, v, s) for s in stages]
        self._dropped = m.dropped_images.labels(model, v)
        self._reasons = [m.exit_reasons.labels(model, v, reason) for reason in EXIT_REASONS]
        self._point_images = lambda point: m.point_images.labels(model, v, point)
        self._expected_images = m.expected_images.labels(model, v)
        self._expected_correct = m.expected_correct.labels(model, v)
        self._expected_flops = m.expected_flops.labels(model, v)
        self._expected_exits = [m.expected_exits.labels(model, v, s) for s in stages]
        self._points: dict[str, Point] = {}
        default = Point.of(manifest)
        self._point_images("default" if default is None else default.id)  # a zero series from the start
        self._current = {}
        self._level = m.degrade_level.labels(model, v, m.worker)
        self._switches = {d: m.point_switches.labels(model, v, d) for d in ("down", "up")}
        self._point_gauge = lambda point: m.operating_point.labels(model, v, m.worker, point)
        self._expected_confidence = m.expected_confidence.labels(model, v)
        self._audit_images = [m.audit_images.labels(model, v, s) for s in stages]
        self._audit_agreements = [m.audit_agreements.labels(model, v, s) for s in stages]
        self._audit_expected = [m.audit_expected.labels(model, v, s) for s in stages]
        self._audit_dropped = {reason: m.audit_dropped.labels(model, v, reason) for reason in DROP_REASONS}
        self._ood = m.ood_images.labels(model, v)
        self._phase = {p: m.request_phase.labels(model, v, p) for p in ("input", "output")}
        self._last = m.last_inference.labels(model, v)
        for outcome in ("success", "fail"):  # zero series from the start, as every other
            m.inference_requests.labels(model, v, outcome)
        drift = manifest.drift
        self._ood_above = drift.p99 if drift is not None else None
        # by the points' own ids, as Point.of names them (the manifest's "default" resolved to its point's id)
        self._point_confidence = drift.exit_confidence if drift is not None else {}

    def ladder(self, rungs: list[Point]) -> None:
        """The version's degrade ladder (service/serving/degrade.py): its points' series exist from now on, the top
        one current."""
        for i, rung in enumerate(rungs):
            self._point_images(rung.id)
            self._current[i] = self._point_gauge(rung.id)
            self._current[i].set(1 if i == 0 else 0)
        self._level.set(0)

    def switched(self, before: int, after: int) -> None:
        """The point new requests run at moved from rung `before` to rung `after`."""
        self._current[before].set(0)
        self._current[after].set(1)
        self._level.set(after)
        self._switches["down" if after > before else "up"].inc()

    def queue_depth(self, stage: int, images: int) -> None:
        self._queue_depth[stage].set(images)

    def waited(self, stage: int, seconds: float) -> None:
        self._queue_duration[stage].observe(seconds)

    def stage_ran(self, stage: int, samples: int, seconds: float, padding_rows: int) -> None:
        self._batch_size[stage].observe(samples)
        self._stage_duration[stage].observe(seconds)
        if padding_rows:
            self._padding[stage].inc(padding_rows * int(self.stage_flops[stage]))

    def dropped(self, images: int) -> None:
        self._dropped.inc(images)

    def phase(self, phase: str, seconds: float) -> None:
        """An inference request spent `seconds` on its input (reading, parsing, decoding) or its output (encoding the
        response)."""
        self._phase[phase].observe(seconds)

    def audited(self, stages: np.ndarray, agree: np.ndarray, expected: np.ndarray) -> None:
        """An audit batch: each answer's exit stage, whether it agreed with the audit model, and the agreement
        validation measured for it (NaN: none stored)."""
        for stage in np.unique(stages).tolist():
            mine = stages == stage
            self._audit_images[stage].inc(int(mine.sum()))
            self._audit_agreements[stage].inc(int(agree[mine].sum()))
            reference = expected[mine]
            reference = reference[~np.isnan(reference)]
            if len(reference):
                self._audit_expected[stage].inc(float(reference.sum()))

    def audit_dropped(self, reason: str, images: int) -> None:
        self._audit_dropped[reason].inc(images)

    def answered(self, result: CascadeResult) -> None:
        self._last.set(time.time())
        flops = result.flops
        n = len(flops)
        self._images.inc(n)
        self._flops.inc(int(flops.sum()))
        self._teacher_flops.inc(self.teacher_flops * n)
        self._saved_vs_teacher.inc(int(np.maximum(self.teacher_flops - flops, 0).sum()))
        self._saved_vs_cascade.inc(int(np.maximum(self.cascade_flops - flops, 0).sum()))
        for stage, count in enumerate(np.bincount(result.exit_stage, minlength=len(self._exits)).tolist()):
            if count:
                self._exits[stage].inc(count)
        for stage, confidence in zip(result.exit_stage.tolist(), result.confidence.tolist()):
            self._confidence[stage].observe(confidence)
        if result.exit_reason is not None:
            for reason, count in enumerate(np.bincount(result.exit_reason, minlength=len(EXIT_REASONS)).tolist()):
                if count:
                    self._reasons[reason].inc(count)
        self._point_images("custom" if result.point is None else result.point).inc(n)
        point = result.point_figures
        if self._ood_above is not None and result.score0 is not None:
            above = int((result.score0 > self._ood_above).sum())
            if above:
                self._ood.inc(above)
        if point is not None and point.accuracy is not None:
            confidence = self._point_confidence.get(point.id)
            if confidence is not None:
                self._expected_confidence.inc(n * confidence)
            self._expected_images.inc(n)
            self._expected_correct.inc(n * point.accuracy)
            self._expected_flops.inc(n * point.mean_flops)
            for stage, fraction in enumerate(point.exit_fractions):
                if fraction:
                    self._expected_exits[stage].inc(n * fraction)


def calibrated_expectation(manifest: Manifest) -> tuple[float, list[float]] | None:
    """(compute fraction of the teacher's, exit fraction per stage) that the version's thresholds gave on the
    validation split: the manifest's calibration section (mean FLOPs, exit counts), recorded when the thresholds
    were chosen. A one-stage model needs none: every image runs its stage. None for a cascade never calibrated
    (nothing measured to compare against)."""
    teacher = manifest.teacher.flops
    if len(manifest.stages) == 1:
        return manifest.stages[0].flops / teacher, [1.0]
    cal = manifest.calibration
    if cal is None or cal.n <= 0 or len(cal.exit_counts) != len(manifest.stages):
        return None
    return cal.mean_flops / teacher, [count / cal.n for count in cal.exit_counts]
