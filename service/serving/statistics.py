"""Triton's statistics extension (GET /v2/models/stats and per model and version), read from the Prometheus
metrics the server keeps anyway, so the two always agree and, with several workers, cover every worker (the
metrics folder is shared: service/serving/metrics.py).

Triton's schema per version: `inference_count` (images answered), `execution_count` (stage batches run),
`last_inference` (ms since the epoch, 0 before any), and `inference_stats` with a count and a duration in ns each:
`success` and `fail` (inference requests answered 200 and not: reskd_inference_request_seconds), `queue` (the waits
of images for their stage batches: reskd_queue_duration_seconds, one per image and stage run, where Triton counts
one per request), `compute_input` (reading, parsing and decoding a request's images), `compute_infer` (stage batches
run: reskd_stage_duration_seconds), `compute_output` (encoding responses), `cache_hit` and `cache_miss` (no response
cache: 0). reskd adds `stage_stats`, per stage its batches' count and time and its queue, which a cascade's
schedule is made of; `batch_stats` is empty (batch sizes are a histogram: reskd_batch_size).
"""

from __future__ import annotations

from collections import defaultdict

from .metrics import Metrics

NS = 1e9


def _pair(count: float, seconds: float) -> dict:
    return {"count": int(round(count)), "ns": int(round(seconds * NS))}


def model_statistics(metrics: Metrics, versions: list[tuple[str, int, int]]) -> dict:
    """versions: (name, version, stages) of the versions to report. -> {"model_stats": [...]} in their order."""
    wanted = {(name, str(version)) for name, version, _ in versions}
    values: dict[tuple, float] = defaultdict(float)
    for family in metrics.families():
        for s in family.samples:
            key = (s.labels.get("model"), s.labels.get("version"))
            if key not in wanted:
                continue
            extra = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model", "version", "le",
                                                                                   "quantile")))
            if "le" in s.labels:
                continue  # histogram buckets: the _sum and _count samples are what is read
            values[(s.name, *key, extra)] += s.value

    def get(name: str, model: tuple, **labels) -> float:
        return values.get((name, *model, tuple(sorted(labels.items()))), 0.0)

    def total(name: str, model: tuple, label: str) -> float:
        return sum(v for (n, m, ver, extra), v in values.items() if n == name and (m, ver) == model
                   and any(k == label for k, _ in extra))

    out = []
    for name, version, stages in versions:
        m = (name, str(version))
        stage_stats = [{
            "stage": stage,
            "execution_count": int(get("reskd_stage_duration_seconds_count", m, stage=str(stage))),
            "compute_infer": _pair(get("reskd_stage_duration_seconds_count", m, stage=str(stage)),
                                   get("reskd_stage_duration_seconds_sum", m, stage=str(stage))),
            "queue": _pair(get("reskd_queue_duration_seconds_count", m, stage=str(stage)),
                           get("reskd_queue_duration_seconds_sum", m, stage=str(stage)))} for stage in range(stages)]
        out.append({
            "name": name, "version": str(version),
            "last_inference": int(get("reskd_last_inference_timestamp_seconds", m) * 1000),
            "inference_count": int(get("reskd_images_total", m)),
            "execution_count": sum(s["execution_count"] for s in stage_stats),
            "inference_stats": {
                "success": _pair(get("reskd_inference_request_seconds_count", m, outcome="success"),
                                 get("reskd_inference_request_seconds_sum", m, outcome="success")),
                "fail": _pair(get("reskd_inference_request_seconds_count", m, outcome="fail"),
                              get("reskd_inference_request_seconds_sum", m, outcome="fail")),
                "queue": _pair(total("reskd_queue_duration_seconds_count", m, "stage"),
                               total("reskd_queue_duration_seconds_sum", m, "stage")),
                "compute_input": _pair(get("reskd_request_phase_seconds_count", m, phase="input"),
                                       get("reskd_request_phase_seconds_sum", m, phase="input")),
                "compute_infer": _pair(total("reskd_stage_duration_seconds_count", m, "stage"),
                                       total("reskd_stage_duration_seconds_sum", m, "stage")),
                "compute_output": _pair(get("reskd_request_phase_seconds_count", m, phase="output"),
                                        get("reskd_request_phase_seconds_sum", m, phase="output")),
                "cache_hit": _pair(0, 0), "cache_miss": _pair(0, 0)},
            "batch_stats": [],
            "stage_stats": stage_stats})
    return {"model_stats": out}
