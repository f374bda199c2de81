"""Triton's statistics extension against real servers on loopback, through stock tritonclient.http: after a known
load (v1 and v2 requests, a failing one) the statistics say what was served and add up to the Prometheus counters
the same server exposes; with two workers they cover both."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server_process import InProcessServer, ServerProcess, metric, scrape

pytestmark = pytest.mark.server

NAME = "fashion-mnist"  # tests/models: version 1, three stages


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def load(c, requests: int = 6) -> tuple[int, int, int]:
    """v1 and v2 requests of a few images each, and one the cascade refuses (422): -> (images, succeeded,
    failed)."""
    images = ok = 0
    for i in range(requests):
        n = 1 + i % 3
        if i % 2:
            r = c.post(f"/v1/models/{NAME}/classify", files=[("file", (f"{j}.png", png(j))) for j in range(n)])
        else:
            x = np.random.default_rng(i).normal(size=(n, 1, 28, 28)).astype(np.float32)
            r = c.post(f"/v2/models/{NAME}/infer", json={"inputs": [{
                "name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        images, ok = images + n, ok + 1
    r = c.post(f"/v2/models/{NAME}/infer", json={"inputs": [{  # refused by the cascade: counted as a failure
        "name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}],
        "parameters": {"threshold": 2.0}})
    assert r.status_code == 422, r.text
    return images, ok, 1


def check(stats: dict, samples: dict, images: int, ok: int, failed: int) -> None:
    assert stats["name"] == NAME and stats["version"] == "1"
    s = stats["inference_stats"]
    assert stats["inference_count"] == images == metric(samples, "reskd_images_total", model=NAME)
    assert s["success"]["count"] == ok and s["fail"]["count"] == failed
    assert s["success"]["ns"] > 0 and s["fail"]["ns"] > 0
    batches = metric(samples, "reskd_stage_duration_seconds_count", model=NAME)
    assert stats["execution_count"] == batches == sum(st["execution_count"] for st in stats["stage_stats"])
    assert s["compute_infer"]["count"] == batches
    assert s["compute_infer"]["ns"] == pytest.approx(
        1e9 * metric(samples, "reskd_stage_duration_seconds_sum", model=NAME), abs=len(stats["stage_stats"]))
    assert s["queue"]["count"] == metric(samples, "reskd_queue_duration_seconds_count", model=NAME)
    # the refused request was read and decoded before the cascade refused it; only answers are encoded
    assert s["compute_input"]["count"] == ok + failed and s["compute_output"]["count"] == ok
    assert s["compute_input"]["ns"] > 0 and s["compute_output"]["ns"] > 0
    assert s["cache_hit"] == s["cache_miss"] == {"count": 0, "ns": 0}
    assert stats["last_inference"] > 1.7e12  # ms since the epoch
    for st in stats["stage_stats"]:
        stage = str(st["stage"])
        assert st["queue"]["count"] == metric(samples, "reskd_queue_duration_seconds_count", model=NAME, stage=stage)


def test_statistics_add_up_to_the_metrics_after_a_known_load():
    import tritonclient.http as triton

    with InProcessServer() as s, s.client() as c:
        tc = triton.InferenceServerClient(s.url.removeprefix("http://"))
        fresh = tc.get_inference_statistics(NAME)["model_stats"][0]
        assert fresh["inference_count"] == 0 and fresh["last_inference"] == 0
        images, ok, failed = load(c)
        samples = scrape(c)
        check(tc.get_inference_statistics(NAME, "1")["model_stats"][0], samples, images, ok, failed)
        every = c.get("/v2/models/stats").json()["model_stats"]
        ready = c.post("/v2/repository/index", json={"ready": True}).json()
        assert {(m["name"], m["version"]) for m in every} == {(e["name"], e["version"]) for e in ready}
        assert (NAME, "1") in {(m["name"], m["version"]) for m in every}
        assert "statistics" in tc.get_server_metadata()["extensions"]
        for path in ("/v2/models/nope/stats", f"/v2/models/{NAME}/versions/9/stats"):
            r = c.get(path)
            assert r.status_code == 404, r.text
        tc.close()


def test_statistics_cover_every_worker():
    with ServerProcess(workers=2) as s, s.client() as c:
        images = ok = failed = 0
        for _ in range(3):  # new connections, so both workers answer some
            with s.client() as fresh:
                n, k, f = load(fresh, requests=4)
                images, ok, failed = images + n, ok + k, failed + f
        samples = scrape(c)
        stats = c.get(f"/v2/models/{NAME}/stats").json()["model_stats"]
        assert len(stats) == 1
        check(stats[0], samples, images, ok, failed)
