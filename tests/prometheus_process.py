"""A real Prometheus (Debian's `prometheus`) for tests: started on a config file, polled until ready, queried
through its HTTP API, stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import lanes
from server_process import free_port, wait_until_ready


def tool_or_fail(name: str) -> str:
    """Debian's prometheus package (prometheus, promtool), which `make test` installs: missing, the test fails
    under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def prometheus_or_fail() -> str:
    return tool_or_fail("prometheus")


class Prometheus:
    def __init__(self, binary: str, config: Path, workdir: Path):
        lanes.require("prometheus", "a Prometheus process")
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
        if r.status_code != 200:
            raise AssertionError(f"{expr}: {r.status_code} {r.text}")
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


def simple_config(workdir: Path, target: str) -> Path:
    """One job, `reskd`, scraping target every second."""
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: reskd\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    return config
