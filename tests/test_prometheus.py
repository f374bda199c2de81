"""A real Prometheus scrapes a real `reskd serve`: the exposition parses, the series the dashboards use exist, and
the documented query for the served share of the teacher's compute gives what the responses say."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_process import ServerProcess, free_port, wait_until_ready


def prometheus_or_fail() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    message = "prometheus is not installed (apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Prometheus:
    def __init__(self, binary: str, target: str, workdir):
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: reskd\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        # Prometheus listens before it can answer queries (its query API answers 503 while the TSDB opens).
        wait_until_ready(f"{self.url}/-/ready", self.proc, self.output, "prometheus")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def query(self, expr: str) -> list:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 30):
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            try:
                result = self.query(expr)
                if result and predicate(float(result[0]["value"][1])):
                    return float(result[0]["value"][1])
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"{expr} never satisfied the condition (last: {result})\n{self.output()}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def test_prometheus_scrapes_the_served_compute_share(tmp_path):
    binary = prometheus_or_fail()
    with ServerProcess() as server:
        prom = Prometheus(binary, server.url.removeprefix("http://"), tmp_path)
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
