"""Prometheus metrics. The names and labels are a contract (DESIGN.md section 3): dashboards and alerts are written
against them. Every series carries `model` and `version`; "% of teacher compute" is
rate(reskd_flops_total[5m]) / rate(reskd_teacher_flops_total[5m])."""

from __future__ import annotations

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def register_model(self, model: str, version: int, num_stages: int) -> None:
        """Create every series of a model up front, so a fresh server already exposes zeros (rate() needs them)."""
        v = str(version)
        self.model_info.labels(model, v, str(num_stages)).set(1)
        self.images.labels(model, v)
        self.flops.labels(model, v)
        self.teacher_flops.labels(model, v)
        self.inflight.labels(model, v)
        for baseline in ("teacher", "cascade"):
            self.flops_saved.labels(model, v, baseline)
        for s in map(str, range(num_stages)):
            self.exits.labels(model, v, s)
            self.batch_size.labels(model, v, s)
            self.stage_duration.labels(model, v, s)
            self.queue_duration.labels(model, v, s)
            self.padding_flops.labels(model, v, s)
            self.queue_depth.labels(model, v, s)

    def record_results(self, model: str, version: int, exit_stage: np.ndarray, flops: np.ndarray,
                       teacher_flops: int, cascade_flops: int) -> None:
        v = str(version)
        n = len(flops)
        used = int(flops.sum())
        self.images.labels(model, v).inc(n)
        self.flops.labels(model, v).inc(used)
        self.teacher_flops.labels(model, v).inc(teacher_flops * n)
        self.flops_saved.labels(model, v, "teacher").inc(int(np.maximum(teacher_flops - flops, 0).sum()))
        self.flops_saved.labels(model, v, "cascade").inc(int(np.maximum(cascade_flops - flops, 0).sum()))
        stages, counts = np.unique(exit_stage, return_counts=True)
        for s, c in zip(stages.tolist(), counts.tolist()):
            self.exits.labels(model, v, str(s)).inc(c)

    def record_stage(self, model: str, version: int, stage: int, samples: int, seconds: float) -> None:
        v, s = str(version), str(stage)
        self.batch_size.labels(model, v, s).observe(samples)
        self.stage_duration.labels(model, v, s).observe(seconds)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
