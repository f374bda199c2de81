"""Scheduling as clients see it, against real `reskd serve` processes: under concurrent load every request gets
exactly its own answers once; per-stage re-batching, request-level batching and the IO-binding path answer the
same; and a later stage's batches hold survivors of several requests."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import real_test_images
from server_process import ServerProcess, metric, scrape

pytestmark = pytest.mark.server

CLASSIFY = "/v1/models/fashion-mnist/classify"
M = {"model": "fashion-mnist", "version": "1"}


@pytest.fixture(scope="module")
def pngs():
    return real_test_images(200)


def plan(pngs, count=160, seed=0):
    """Requests of 1-6 images with a mix of thresholds: (image indices, query)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        idx = [rng.randrange(len(pngs)) for _ in range(rng.randint(1, 6))]
        query = rng.choice([{}, {"threshold": 1.0}, {"threshold": 0.99}, {"max_stage": 1, "threshold": 1.0}])
        requests.append((idx, query))
    return requests


def send_all(server, pngs, requests, threads=16):
    def one(item):
        n, (idx, query) = item
        files = [("file", (f"r{n}-{i}.png", pngs[i])) for i in idx]
        with server.client() as c:
            r = c.post(CLASSIFY, files=files, params=query)
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(requests)))


def test_no_request_is_lost_or_answered_twice_and_policies_agree(pngs):
    requests = plan(pngs)
    answers = {}
    for scheduler, runner in (("stage", "host"), ("request", "host"), ("stage", "bound")):
        with ServerProcess(scheduler=scheduler, stage_runner=runner, max_batch_size=16, max_queue_delay_ms=3,
                           batch_buckets="[1, 4, 16, 64]") as s:
            with s.client() as c:
                before = scrape(c)
            got = send_all(s, pngs, requests)
            with s.client() as c:
                after = scrape(c)
        for n, ((idx, _), preds) in enumerate(zip(requests, got)):
            assert [p["filename"] for p in preds] == [f"r{n}-{i}.png" for i in idx]
        total = sum(len(idx) for idx, _ in requests)
        assert metric(after, "reskd_images_total", **M) - metric(before, "reskd_images_total", **M) == total
        assert (metric(after, "reskd_requests_total", code="200", endpoint="/v1/models/{name}/classify", **M)
                - metric(before, "reskd_requests_total", code="200", endpoint="/v1/models/{name}/classify", **M)
                == len(requests))
        exits = [p["exit_stage"] for preds in got for p in preds]
        assert set(exits) == {0, 1, 2}
        padding = sum(metric(after, "reskd_padding_flops_total", stage=str(st), **M) for st in range(3))
        assert (padding > 0) == (runner == "bound")
        answers[(scheduler, runner)] = [[(p["class_id"], p["exit_stage"], p["flops"], round(p["confidence"], 5))
                                         for p in preds] for preds in got]
    reference = answers[("stage", "host")]
    assert answers[("request", "host")] == reference
    assert answers[("stage", "bound")] == reference


def test_a_stage_1_batch_holds_survivors_of_several_requests(pngs):
    # Stage 0 takes one image at a time; stage 1 waits up to 300 ms to fill: its batches can only be large by
    # merging survivors of different requests (each request here is one image).
    with ServerProcess(stage_max_batch_size="[1, 64, 64]", stage_max_queue_delay_ms="[0, 300, 0]") as s:
        with s.client() as c:
            before = scrape(c)
        preds = send_all(s, pngs, [([i], {"threshold": 1.0}) for i in range(12)], threads=12)
        with s.client() as c:
            after = scrape(c)
    survivors = sum(p[0]["exit_stage"] >= 1 for p in preds)
    assert survivors >= 6

    def delta(name, stage):
        return metric(after, name, stage=stage, **M) - metric(before, name, stage=stage, **M)

    assert delta("reskd_batch_size_count", "0") == 12  # one request per stage-0 batch
    assert delta("reskd_batch_size_sum", "1") == survivors
    assert delta("reskd_batch_size_count", "1") < survivors  # so some stage-1 batch merged several requests
