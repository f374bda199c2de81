"""A real Prometheus scrapes a real `reskd serve`: the exposition parses, the series the dashboards use exist, and
the documented query for the served share of the teacher's compute gives what the responses say."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prometheus_process import Prometheus, prometheus_or_fail, simple_config
from server_process import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.prometheus]


def test_prometheus_scrapes_the_served_compute_share(tmp_path):
    binary = prometheus_or_fail()
    with ServerProcess() as server:
        prom = Prometheus(binary, simple_config(tmp_path, server.url.removeprefix("http://")), tmp_path)
        try:
            m = '{job="reskd",model="fashion-mnist",version="1"}'
            prom.wait_for('up{job="reskd"}', lambda v: v == 1)
            prom.wait_for(f"reskd_images_total{m}", lambda v: v == 0)  # a zero sample before any traffic
            rng = np.random.default_rng(0)
            served = []
            with server.client() as c:
                for threshold in (None, 1.0, 0.5):
                    files = []
                    for i in range(16):
                        buf = io.BytesIO()
                        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
                        files.append(("file", (f"{i}.png", buf.getvalue())))
                    params = {} if threshold is None else {"threshold": threshold}
                    r = c.post("/v1/classify", files=files, params=params)
                    assert r.status_code == 200, r.text
                    served += r.json()["predictions"]
            prom.wait_for(f"reskd_images_total{m}", lambda v: v == len(served))
            teacher = served[0]["flops"] + served[0]["flops_saved_vs_teacher"]
            want = sum(p["flops"] for p in served) / (len(served) * teacher)
            share = prom.wait_for(f"rate(reskd_flops_total{m}[1m]) / rate(reskd_teacher_flops_total{m}[1m])",
                                  lambda v: True)
            assert share == pytest.approx(want, rel=1e-9)
            exits = prom.query(f"sum by (stage) (reskd_exits_total{m})")
            counts = {r["metric"]["stage"]: float(r["value"][1]) for r in exits}
            assert counts == {str(s): sum(p["exit_stage"] == s for p in served) for s in range(3)}
            assert counts["2"] > 0  # threshold=1.0 sent images to the last stage
            batches = prom.query('reskd_batch_size_count{job="reskd",model="fashion-mnist",stage="0"}')
            assert float(batches[0]["value"][1]) >= 3
        finally:
            prom.stop()
