"""The shadow audit and the drift signal through real servers on loopback: real Fashion-MNIST test images are
audited against the teacher and the metrics say what the audit model answers; an unloaded audit model pauses the
audit (counted); bad audit settings stop `reskd serve` with status 2 and a message naming them."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from conftest import FASHION_MNIST_DIR, real_fashion_mnist_or_fail
from reskd.manifest import load_manifest
from reskd.preprocess import normalise
from reskd.runtime import CascadeRuntime
from server_process import serve_settings_refused, BUNDLED, InProcessServer, metric, scrape

pytestmark = pytest.mark.server

FALLBACK, CASCADE, TEACHER = "fashion-mnist-fallback", "fashion-mnist", "fashion-mnist-teacher"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for name in (FALLBACK, CASCADE, TEACHER):
        (root / name).symlink_to(BUNDLED / name)
    return root


@pytest.fixture(scope="module")
def test_images():
    real_fashion_mnist_or_fail()
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 1, 28, 28)[:300]
    return normalise(pixels, load_manifest(BUNDLED / FALLBACK / "1").input).astype(np.float32)


def infer(c, name, x, version: int | None = None, **parameters):
    where = name if version is None else f"{name}/versions/{version}"
    r = c.post(f"/v2/models/{where}/infer", json={"inputs": [{
        "name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
        "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def settled(c, name, want):
    """Scrapes until the audit has counted `want` images of `name` (it runs after the responses)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        samples = scrape(c)
        done = metric(samples, "reskd_audit_images_total", model=name) + \
            metric(samples, "reskd_audit_dropped_total", model=name)
        if done >= want or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_real_images_are_audited_against_the_teacher(repo, test_images):
    x = test_images
    fallback = CascadeRuntime(BUNDLED / FALLBACK / "1")
    with InProcessServer(repo=repo, audit_fraction=1, audit_max_compute_pct=1000) as s, s.client() as c:
        before = scrape(c)
        default = fallback.manifest.operating_points.default
        for stage in (0, 1):  # the validation references, from the manifest
            assert metric(before, "reskd_audit_reference_agreement", model=FALLBACK, stage=str(stage)) == \
                pytest.approx(fallback.manifest.audit.points[default][stage])
        assert metric(before, "reskd_calibrated_ood_fraction", model=FALLBACK) == \
            pytest.approx(fallback.manifest.drift.above_p99)
        outputs = [infer(c, FALLBACK, x[i:i + 100]) for i in range(0, len(x), 100)]
        stages = np.concatenate([np.asarray(next(o for o in out["outputs"] if o["name"] == "exit_stage")["data"])
                                 for out in outputs])
        classes = np.concatenate([np.asarray(next(o for o in out["outputs"] if o["name"] == "class_id")["data"])
                                  for out in outputs])
        early = stages < 2
        samples = settled(c, FALLBACK, early.sum())
    teacher = fallback.stage_logits(2, x).argmax(-1)
    assert metric(samples, "reskd_audit_images_total", model=FALLBACK) == early.sum()
    assert metric(samples, "reskd_audit_agreements_total", model=FALLBACK) == (classes == teacher)[early].sum()
    assert metric(samples, "reskd_audit_dropped_total", model=FALLBACK) == 0
    expected = sum(fallback.manifest.audit.points[default][s] * (stages == s).sum() for s in (0, 1))
    assert metric(samples, "reskd_audit_expected_agreements_total", model=FALLBACK) == pytest.approx(expected)
    mean_conf = fallback.manifest.drift.exit_confidence[default]
    assert metric(samples, "reskd_expected_exit_confidence_total", model=FALLBACK) == \
        pytest.approx(len(x) * mean_conf)


def test_an_unloaded_audit_model_pauses_the_audit(repo, test_images):
    """fashion-mnist/2 (two stages, no fallback stage) audits its early answers against its teacher.model,
    fashion-mnist-teacher:2: unloading that model pauses the audit (answers dropped as `unloaded`), loading it resumes
    it. Pinned to version 2: a version with a teacher fallback audits against its own last stage instead."""
    x = test_images[:100]
    labels = {"model": CASCADE, "version": "2"}
    with InProcessServer(repo=repo, model_control="explicit", audit_fraction=1,
                         audit_max_compute_pct=1000) as s, s.client() as c:
        out = infer(c, CASCADE, x, version=2)
        early = (np.asarray(next(o for o in out["outputs"] if o["name"] == "exit_stage")["data"]) < 1).sum()
        samples = settled(c, CASCADE, early)
        assert metric(samples, "reskd_audit_images_total", **labels) == early  # against fashion-mnist-teacher:2
        assert c.post(f"/v2/repository/models/{TEACHER}/unload").status_code == 200
        out = infer(c, CASCADE, x, version=2)
        samples = settled(c, CASCADE, 2 * early)
        assert metric(samples, "reskd_audit_dropped_total", reason="unloaded", **labels) == early
        assert metric(samples, "reskd_audit_images_total", **labels) == early
        assert c.post(f"/v2/repository/models/{TEACHER}/load").status_code == 200  # and it resumes
        infer(c, CASCADE, x, version=2)
        samples = settled(c, CASCADE, 3 * early)
        assert metric(samples, "reskd_audit_images_total", **labels) == 2 * early


def test_bad_audit_settings_stop_the_start_with_a_message():
    out = serve_settings_refused(RESKD_AUDIT_FRACTION="-0.1", RESKD_AUDIT_MAX_COMPUTE_PCT="0")
    assert out.returncode == 2, out.stderr
    assert "RESKD_AUDIT_FRACTION: Input should be greater than or equal to 0" in out.stderr, out.stderr
    assert "RESKD_AUDIT_MAX_COMPUTE_PCT: Input should be greater than 0" in out.stderr, out.stderr
    out = serve_settings_refused(RESKD_AUDIT_FRACTION="1.5", RESKD_AUDIT_MAX_COMPUTE_PCT="20000")
    assert out.returncode == 2, out.stderr
    assert "RESKD_AUDIT_FRACTION: Input should be less than or equal to 1" in out.stderr, out.stderr
    assert "RESKD_AUDIT_MAX_COMPUTE_PCT: Input should be less than or equal to 10000" in out.stderr, out.stderr
    out = serve_settings_refused(RESKD_AUDIT_MODEL="no-such-model:1")
    assert out.returncode == 2 and "RESKD_AUDIT_MODEL: no model 'no-such-model'" in out.stderr, out.stderr
    out = serve_settings_refused(RESKD_AUDIT_MODEL="teacher")  # no version
    assert out.returncode == 2 and "RESKD_AUDIT_MODEL" in out.stderr, out.stderr
