"""Prometheus metrics. The names and labels are a contract (docs/design.md, "Metrics"): dashboards and alerts are
written against them. Every series carries `model` and `version`; "% of teacher compute" is
rate(reskd_flops_total[5m]) / rate(reskd_teacher_flops_total[5m]).

Metrics owns the registry and the HTTP-level series; ModelMetrics holds one model version's series, resolved once,
and is what that version's scheduler reports to (its SchedulerObserver)."""

from __future__ import annotations

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from reskd.cascade import CascadeResult

# The *_created companion series only clutter a scrape; rates do not need them.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
M = ("model", "version")


class Metrics:
    """One registry per app, so several servers (tests) never share counters."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("reskd_requests_total", "HTTP requests answered", [*M, "endpoint", "code"],
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
        self.queue_depth = Gauge("reskd_queue_depth", "images waiting for a stage", [*M, "stage"], registry=r)
        self.inflight = Gauge("reskd_inflight_requests", "requests being served", M, registry=r)
        self.model_info = Gauge("reskd_model_info", "a served model version (value 1)", [*M, "stages"],
                                registry=r)

    def for_model(self, model: str, version: int, stage_flops: np.ndarray, teacher_flops: int) -> ModelMetrics:
        return ModelMetrics(self, model, version, stage_flops, teacher_flops)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class ModelMetrics:
    """One model version's series. Creating it creates every series up front, so a fresh server already exposes
    zeros (rate() needs them)."""

    def __init__(self, metrics: Metrics, model: str, version: int, stage_flops: np.ndarray, teacher_flops: int):
        m, v = metrics, str(version)
        stages = [str(s) for s in range(len(stage_flops))]
        self.stage_flops = np.asarray(stage_flops, dtype=np.int64)
        self.teacher_flops = int(teacher_flops)
        self.cascade_flops = int(self.stage_flops.sum())
        m.model_info.labels(model, v, str(len(stages))).set(1)
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

    def queue_depth(self, stage: int, images: int) -> None:
        self._queue_depth[stage].set(images)

    def waited(self, stage: int, seconds: float) -> None:
        self._queue_duration[stage].observe(seconds)

    def stage_ran(self, stage: int, samples: int, seconds: float, padding_rows: int) -> None:
        self._batch_size[stage].observe(samples)
        self._stage_duration[stage].observe(seconds)
        if padding_rows:
            self._padding[stage].inc(padding_rows * int(self.stage_flops[stage]))

    def answered(self, result: CascadeResult) -> None:
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
