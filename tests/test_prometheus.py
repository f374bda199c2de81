"""A real Prometheus scrapes a real `reskd serve`: the exposition parses, the series the dashboards use exist, and
the documented query for the served share of the teacher's compute gives what the responses say."""

from __future__ import annotations

import io
import time

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


def alert_expr(name: str) -> str:
    """The expression of one alert of deploy/prometheus/alerts.rules.yml (its `for:` is left out: the test asks
    whether the condition holds now)."""
    import yaml

    from server_process import ROOT

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.rules.yml").read_text())
    return next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)


def test_the_drift_alerts_fire_for_shifted_inputs_only(tmp_path):
    """A real Prometheus scrapes a server that gets real Fashion-MNIST test images for one version and the same
    images inverted (inputs unlike the training data) for another, every early answer audited: the audit and
    drift alerts' expressions return the second version only."""
    import gzip

    from conftest import FASHION_MNIST_DIR, real_fashion_mnist_or_fail
    from reskd.manifest import load_manifest
    from reskd.preprocess import normalise
    from server_process import BUNDLED, metric, scrape

    real_fashion_mnist_or_fail()
    binary = prometheus_or_fail()
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("fashion-mnist", "fashion-mnist-teacher", "fashion-mnist-fallback"):
        (repo / name).symlink_to(BUNDLED / name)
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 1, 28, 28)[:600]
    spec = load_manifest(BUNDLED / "fashion-mnist" / "2").input
    # each version named (a newer bundled version does not change what is tested): fashion-mnist/2 audits against
    # its teacher.model, fashion-mnist-fallback/1 against its own fallback stage
    sent = {("fashion-mnist-fallback", 1): normalise(pixels, spec), ("fashion-mnist", 2): normalise(255 - pixels, spec)}
    with ServerProcess(repo=repo, audit_fraction=1, audit_max_compute_pct=10000) as server:
        prom = Prometheus(binary, simple_config(tmp_path, server.url.removeprefix("http://")), tmp_path)
        try:
            prom.wait_for('up{job="reskd"}', lambda v: v == 1)
            prom.wait_for('reskd_images_total{job="reskd",model="fashion-mnist",version="2"}', lambda v: v == 0)
            with server.client() as c:
                for (name, version), x in sent.items():
                    for i in range(0, len(x), 100):
                        part = x[i:i + 100].astype(np.float32)
                        r = c.post(f"/v2/models/{name}/versions/{version}/infer", json={"inputs": [{
                            "name": "images", "datatype": "FP32", "shape": list(part.shape),
                            "data": part.reshape(-1).tolist()}]})
                        assert r.status_code == 200, r.text
                for _ in range(600):  # the audits run after the answers
                    m = scrape(c)
                    if metric(m, "reskd_audit_images_total") + metric(m, "reskd_audit_dropped_total") == \
                            metric(m, "reskd_exits_total", stage="0") + metric(m, "reskd_exits_total", stage="1",
                                                                                model="fashion-mnist-fallback"):
                        break
                    time.sleep(0.1)
                audited = metric(m, "reskd_audit_images_total")
            prom.wait_for('sum(reskd_audit_images_total{job="reskd"})', lambda v: v == audited)
            prom.wait_for('sum(reskd_images_total{job="reskd"})', lambda v: v == 1200)
            for alert in ("ReskdAuditDisagreement", "ReskdInputDrift"):
                firing = {(r["metric"]["model"], r["metric"]["version"]) for r in prom.query(alert_expr(alert))}
                assert firing == {("fashion-mnist", "2")}, (alert, firing)
            assert prom.query(alert_expr("ReskdAuditPaused")) == []
            shifted = prom.query(alert_expr("ReskdConfidenceShifted"))
            assert ("fashion-mnist-fallback", "1") not in {(r["metric"]["model"], r["metric"]["version"])
                                                           for r in shifted}
        finally:
            prom.stop()
