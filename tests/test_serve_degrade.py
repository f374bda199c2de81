"""Degrading under load and deadlines, against real servers on loopback: a burst moves the server down its curve and
it comes back up (polled on the point metric, never timed); every exit reason reaches responses (v1 and v2, as a
stock client reads it) and metrics; deadlines answer from the stages run or 504; bad request values get 422 and bad
settings stop `reskd serve` with status 2."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from server_process import serve_settings_refused, BUNDLED, MODELS, InProcessServer, ServerProcess, metric, scrape

pytestmark = pytest.mark.server

NAME = "fashion-mnist-fallback"  # a version with stored operating points
INFER = f"/v2/models/{NAME}/infer"
CLASSIFY = f"/v1/models/{NAME}/classify"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / NAME).symlink_to(BUNDLED / NAME)
    (root / "fashion-mnist").symlink_to(MODELS / "fashion-mnist")  # no stored points: never degraded
    return root


def v2_body(x: np.ndarray, **parameters) -> dict:
    return {"json": {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                 "data": x.reshape(-1).tolist()}], "parameters": parameters}}


def png(value=128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), value).save(buf, "PNG")
    return buf.getvalue()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 28, 28)).astype(np.float32)


def test_a_burst_moves_the_server_down_its_curve_and_back_up(repo):
    # A tiny objective (5 ms) and a short hold: a burst of concurrent requests keeps the wait above half of it.
    with ServerProcess(repo=repo, latency_slo_ms=5, max_queue_wait_ms=5, degrade_hold_s=1, decode_workers=1) as s, \
            s.client() as c:
        before = scrape(c)
        assert metric(before, "reskd_degrade_level", model=NAME) == 0
        assert metric(before, "reskd_operating_point", model=NAME, point="default") == 1
        body = v2_body(images(64))
        seen = set()

        def one(_):
            r = c.post(INFER, **body)
            if r.status_code == 200:
                return r.json()["parameters"]["operating_point"]
            assert r.status_code == 503, r.text
            return None

        deadline, levels = time.monotonic() + 60, []
        with ThreadPoolExecutor(12) as pool:
            while time.monotonic() < deadline and "default" not in seen or not (seen - {"default", None}):
                seen.update(pool.map(one, range(48)))
                levels.append(metric(scrape(c), "reskd_degrade_level", model=NAME))
                if seen - {"default", None}:
                    break
        assert seen - {"default", None}, f"never degraded: points {seen}, levels {levels}\n{s.output()[-2000:]}"
        during = scrape(c)
        assert metric(during, "reskd_point_switches_total", model=NAME, direction="down") >= 1
        assert metric(during, "reskd_exit_reasons_total", model=NAME, reason="load") > 0
        # the load is gone: back to the top point once the hold is over (no request needed)
        deadline = time.monotonic() + 30
        while metric(scrape(c), "reskd_degrade_level", model=NAME) > 0:
            assert time.monotonic() < deadline, "never came back up"
            time.sleep(0.2)
        after = scrape(c)
        assert metric(after, "reskd_operating_point", model=NAME, point="default") == 1
        assert metric(after, "reskd_point_switches_total", model=NAME, direction="up") >= 1
        r = c.post(INFER, **body)
        assert r.status_code == 200 and r.json()["parameters"]["operating_point"] == "default"
        # a version without stored points is never degraded (it has no point series)
        assert metric(after, "reskd_degrade_level", model="fashion-mnist") == 0


def test_every_exit_reason_and_the_point_reach_responses_and_metrics(repo):
    import tritonclient.http as triton

    with InProcessServer(repo=repo) as s, s.client() as c:
        model = s.app.state.reskd.store.get(NAME)
        x = images(32, seed=1)
        # v1: the point and its validation accuracy, a reason per prediction
        r = c.post(CLASSIFY, files=[("file", (f"{i}.png", png(30 * i), "image/png")) for i in range(3)])
        assert r.status_code == 200, r.text
        body = r.json()
        top = model.manifest.operating_points.point("default")
        assert body["operating_point"] == {"id": "default", "accuracy": top.accuracy}
        assert {p["exit_reason"] for p in body["predictions"]} <= {"confident", "final"}
        r = c.post(CLASSIFY, params={"max_stage": 0}, files=[("file", ("a.png", png(), "image/png"))])
        assert r.json()["operating_point"] == {"id": "custom", "accuracy": None}
        assert r.json()["predictions"][0]["exit_reason"] in ("max_stage", "confident")
        # v2 through the stock client: exit_reason is a BYTES output returned with the others
        client = triton.InferenceServerClient(s.url.removeprefix("http://"))
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(NAME, [inp], parameters={"threshold": 1.0, "max_stage": 1})
        assert set(result.as_numpy("exit_reason").astype(str)) == {"max_stage"}
        assert result.get_response()["parameters"] == {"operating_point": "custom"}
        result = client.infer(NAME, [inp])
        assert set(result.as_numpy("exit_reason").astype(str)) <= {"confident", "final"}
        assert result.get_response()["parameters"] == {"operating_point": "default",
                                                       "operating_point_accuracy": top.accuracy}
        assert "final" in result.as_numpy("exit_reason").astype(str) or "confident" in \
            result.as_numpy("exit_reason").astype(str)
        # degraded: the controller held at a cheaper point (as under load); the answers say so
        controller = model.scheduler.controller
        controller._switch(len(controller.rungs) - 1)
        controller.update = lambda *measured: controller.current
        low = controller.rungs[-1]
        degraded = client.infer(NAME, [inp])
        assert degraded.get_response()["parameters"] == {"operating_point": low.id,
                                                         "operating_point_accuracy": low.accuracy}
        assert "load" in set(degraded.as_numpy("exit_reason").astype(str))
        opted_out = client.infer(NAME, [inp], parameters={"degrade": False})
        assert opted_out.get_response()["parameters"]["operating_point"] == "default"
        assert "load" not in set(opted_out.as_numpy("exit_reason").astype(str))
        r = c.post(CLASSIFY, params={"degrade": "false"}, files=[("file", ("a.png", png(), "image/png"))])
        assert r.json()["operating_point"]["id"] == "default"
        # deadlines: stage 0 slowed down, so the deadline passes while it runs: answered from stage 0
        real_run = model.scheduler.runner.run

        def slow(stage, parts, keep=False):
            if stage == 0:
                time.sleep(0.2)
            return real_run(stage, parts, keep)

        model.scheduler.runner.run = slow
        try:
            # the stock client's own timeout argument: Triton's `timeout` parameter, in microseconds
            late = client.infer(NAME, [inp], parameters={"threshold": 1.0}, timeout=50_000)
            assert set(late.as_numpy("exit_reason").astype(str)) == {"deadline"}
            assert (late.as_numpy("exit_stage") == 0).all()
            r = c.post(CLASSIFY, params={"threshold": 1.0, "timeout_ms": 50},
                       files=[("file", ("a.png", png(), "image/png"))])
            assert r.status_code == 200 and r.json()["predictions"][0]["exit_reason"] == "deadline"
            # a deadline that passes before the request's images ran any stage: 504, saying so
            r = c.post(INFER, **v2_body(x[:2], timeout=1))
            assert r.status_code == 504 and "not yet run by any stage" in r.json()["error"], r.text
        finally:
            model.scheduler.runner.run = real_run
        m = scrape(c)
        for reason in ("confident", "final", "max_stage", "load", "deadline"):
            assert metric(m, "reskd_exit_reasons_total", model=NAME, reason=reason) > 0, reason
        assert metric(m, "reskd_point_images_total", model=NAME, point="custom") > 0
        assert metric(m, "reskd_point_images_total", model=NAME, point=low.id) == len(x)
        assert metric(m, "reskd_requests_total", code="504") >= 1


def test_bad_degrade_and_timeout_values_get_422_naming_them(repo):
    with InProcessServer(repo=repo) as s, s.client() as c:
        x = images(1)
        for params, name in [({"timeout": -1}, "timeout"), ({"timeout": "soon"}, "timeout"),
                             ({"timeout": True}, "timeout"), ({"degrade": "no"}, "degrade"),
                             ({"degrade": 0}, "degrade")]:
            r = c.post(INFER, **v2_body(x, **params))
            assert r.status_code == 422 and name in r.json()["error"], (params, r.text)
        for params, name in [({"timeout_ms": -1}, "timeout_ms"), ({"timeout_ms": "soon"}, "timeout_ms"),
                             ({"degrade": "maybe"}, "degrade")]:
            r = c.post(CLASSIFY, params=params, files=[("file", ("a.png", png(), "image/png"))])
            assert r.status_code == 422 and name in r.json()["error"], (params, r.text)
        assert c.post(INFER, **v2_body(x, timeout=0, degrade=True)).status_code == 200  # 0: no deadline


def test_bad_degrade_settings_stop_the_start_with_a_message():
    out = serve_settings_refused(RESKD_LATENCY_SLO_MS="500", RESKD_MAX_QUEUE_WAIT_MS="250")
    assert out.returncode == 2 and "RESKD_LATENCY_SLO_MS (500) must not exceed RESKD_MAX_QUEUE_WAIT_MS (250)" \
        in out.stderr, out.stderr
    out = serve_settings_refused(RESKD_DEGRADE="sometimes", RESKD_DEGRADE_HOLD_S="0", RESKD_LATENCY_SLO_MS="-5")
    assert out.returncode == 2, out.stderr
    assert "RESKD_DEGRADE: Input should be a valid boolean" in out.stderr, out.stderr
    assert "RESKD_DEGRADE_HOLD_S: Input should be greater than 0" in out.stderr, out.stderr
    assert "RESKD_LATENCY_SLO_MS: Input should be greater than 0" in out.stderr, out.stderr


def test_json_outputs_carry_the_reasons_as_strings(repo):
    with InProcessServer(repo=repo) as s, s.client() as c:
        r = c.post(INFER, **v2_body(images(3), max_stage=0, threshold=1.0))  # none confident enough at stage 0
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["exit_reason"] == {"name": "exit_reason", "datatype": "BYTES", "shape": [3],
                                      "data": ["max_stage"] * 3}
        meta = c.get(f"/v2/models/{NAME}").json()
        assert {"name": "exit_reason", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]
        assert json.dumps(meta)  # serialisable as ever
