"""Model control under live traffic, against a real `reskd serve` on loopback (RESKD_MODEL_CONTROL=poll and
explicit, tritonclient for the repository API): new and changed versions take over without a failed or mixed
request, broken versions are refused while the old one answers, unloading drains. Each version in these tests
behaves distinctly (its labels carry a prefix, its thresholds send every image to stage 0 or to the last stage),
so every response shows which version computed it. Each test runs with one server process and with two workers
(RESKD_WORKERS=2, service/supervisor.py), whose clients open a new connection per request so that their requests
land on either worker: a change must reach both at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model_versions import CLASSIFY, IMAGES, NAME, Traffic, noise_pngs, write_version
from server_process import ServerProcess, metric, scrape

pytestmark = pytest.mark.server

TOKEN = "s3cret"


@pytest.fixture(params=[1, 2], ids=["1-process", "2-workers"])
def workers(request) -> int:
    return request.param


def spread(workers: int, headers: dict | None = None) -> dict:
    """Headers for Traffic: with several workers each request on a new connection, so any worker may answer it."""
    return {**(headers or {}), **({"Connection": "close"} if workers > 1 else {})}


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository with one model: version 1 sending every image through every stage, labels as bundled."""
    write_version(tmp_path, 1, prefix="", thresholds=1.0)
    return tmp_path


def behaviour(body: dict) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    """What a response shows of the version that computed it: the label prefix, the exit stages, the labels."""
    preds = body["predictions"]
    labels = tuple(p["label"] for p in preds)
    prefixes = {label.split(":")[0] + ":" if ":" in label else "" for label in labels}
    assert len(prefixes) == 1, f"one response mixes versions: {labels}"
    return prefixes.pop(), tuple(p["exit_stage"] for p in preds), labels


def reference(client: httpx.Client, version: int) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    files = [("file", (f"{k}.png", b, "image/png")) for k, b in enumerate(IMAGES)]
    r = client.post(f"/v1/models/{NAME}/versions/{version}/classify", files=files)
    assert r.status_code == 200, r.text
    return behaviour(r.json())


def check_switch(traffic: Traffic, expected: dict[str, tuple[int, tuple]]) -> None:
    """expected: label prefix -> (version number, what that version computes), in rollout order. Every request
    got 200 once; every response is exactly what the version it names computes (nothing mixed); each client saw
    the versions in rollout order (never an old one after a newer one); every version answered."""
    order = list(expected)
    traffic.wait_count(100)
    responses = traffic.stop()
    assert len(responses) >= 100, f"only {len(responses)} requests: not much of a load"
    assert {status for status, _ in responses} == {200}, [b for s, b in responses if s != 200][:3]
    for client in traffic.results:
        seen = []
        for _, body in client:
            got = behaviour(body)
            version, computed = expected[got[0]]
            assert body["version"] == version and got == computed, f"a response no version computes: {got}"
            seen.append(order.index(got[0]))
        assert seen == sorted(seen), f"a client got an older version after a newer one: {seen}"
    assert {behaviour(b)[0] for _, b in responses} == set(order), "not every version answered"


def test_poll_serves_new_and_changed_versions_under_load_without_a_failed_or_mixed_request(repo, workers):
    with ServerProcess(repo=repo, workers=workers, model_control="poll", repository_poll_s=0.2) as s, \
            s.client() as c:
        v1 = reference(c, 1)
        assert v1[0] == "" and set(v1[1]) == {2}
        traffic = Traffic(s.url, headers=spread(workers))
        traffic.wait_for(lambda status, body: status == 200)
        time.sleep(0.5)
        write_version(repo, 2, prefix="v2:", thresholds=0.0)  # a new version
        traffic.wait_for(lambda status, body: status == 200 and body["version"] == 2)
        time.sleep(0.5)
        write_version(repo, 2, prefix="v2b:", thresholds=0.0)  # the same version changed in place
        traffic.wait_for(lambda status, body: status == 200 and body["predictions"][0]["label"].startswith("v2b:"))
        time.sleep(0.5)
        v2b = reference(c, 2)
        assert v2b[0] == "v2b:" and set(v2b[1]) == {0}
        v2 = ("v2:", v2b[1], tuple(label.replace("v2b:", "v2:") for label in v2b[2]))
        check_switch(traffic, {"": (1, v1), "v2:": (2, v2), "v2b:": (2, v2b)})

        meta = c.get(f"/v2/models/{NAME}").json()
        assert meta["versions"] == ["1", "2"] and meta["version"] == "2" and meta["labels"][0].startswith("v2b:")
        samples = scrape(c)
        assert metric(samples, "reskd_model_info", model=NAME, version="2") == 1
        assert metric(samples, "reskd_model_loads_total", model=NAME, version="2", result="loaded") == 2
        assert metric(samples, "reskd_model_refused", model=NAME) == 0

        shutil.rmtree(repo / NAME / "2")  # roll back: version 1 is the highest again
        deadline = time.monotonic() + 20
        while c.get(f"/v2/models/{NAME}").json()["version"] != "1":
            assert time.monotonic() < deadline, "version 2 still served after its folder was removed"
            time.sleep(0.1)
        assert reference(c, 1) == v1
        r = c.post(f"/v1/models/{NAME}/versions/2/classify", files=[("file", ("a.png", IMAGES[0]))])
        assert r.status_code == 404 and "removed from the repository" in r.json()["error"]
        assert metric(scrape(c), "reskd_model_info", model=NAME, version="2") == 0


def test_stage_files_copied_over_with_the_same_bytes_are_not_reloaded(repo, workers):
    """A rollout tool that copies identical files over a served version (or a `touch`) moves their mtimes, which
    the scan sees; the bytes still match the manifest's sha256, so nothing is loaded again. Before: a reload per
    such scan, which also made the in-place change above count 3 loads instead of 2 when a poll fell between the
    files and the manifest."""
    with ServerProcess(repo=repo, workers=workers, model_control="poll", repository_poll_s=3600) as s, \
            s.client() as c:
        folder = repo / NAME / "1"
        manifest = json.loads((folder / "manifest.json").read_text())
        for stage in manifest["stages"]:
            data = (folder / stage["file"]).read_bytes()
            (folder / stage["file"]).write_bytes(data)  # the same bytes, a new mtime
            os.utime(folder / stage["file"], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        write_version(repo, 2, prefix="v2:", thresholds=0.0)  # a real change in the same scan: it ran
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while c.get(f"/v2/models/{NAME}").json()["versions"] != ["1", "2"]:
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.05)
        samples = scrape(c)
        assert metric(samples, "reskd_model_loads_total", model=NAME, version="1", result="loaded") == 1
        assert metric(samples, "reskd_model_loads_total", model=NAME, version="2", result="loaded") == 1
        assert c.post(f"/v1/models/{NAME}/versions/1/classify", files=[("file", ("a.png", IMAGES[0]))]) \
            .status_code == 200


def test_sighup_scans_the_repository_at_once_under_poll_and_no_longer_kills_the_server(repo, workers):
    with ServerProcess(repo=repo, workers=workers, model_control="poll", repository_poll_s=3600) as s, \
            s.client() as c:
        write_version(repo, 2, prefix="v2:", thresholds=0.0)
        time.sleep(0.3)
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while c.get(f"/v2/models/{NAME}").json()["versions"] != ["1", "2"]:
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.05)
        assert "SIGHUP: scanning the model repository" in s.output()
    write_version(repo, 3, prefix="v3:", thresholds=0.0)
    with ServerProcess(repo=repo, workers=workers) as s, s.client() as c:  # none: SIGHUP is logged and ignored
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "2", "3"]
        shutil.rmtree(repo / NAME / "3")
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert s.proc.poll() is None, s.output()
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "2", "3"]
        assert "SIGHUP ignored: RESKD_MODEL_CONTROL=none" in s.output()
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "RESKD_MODEL_CONTROL=explicit" in r.json()["error"]


def test_broken_versions_are_refused_with_their_reason_while_the_old_version_answers(repo, workers):
    with ServerProcess(repo=repo, workers=workers, model_control="poll", repository_poll_s=0.2) as s, \
            s.client() as c:
        v1 = reference(c, 1)
        traffic = Traffic(s.url, headers=spread(workers))
        traffic.wait_for(lambda status, body: status == 200)
        write_version(repo, 2, prefix="v2:", thresholds=0.0, break_it="sha256")
        write_version(repo, 3, prefix="v3:", thresholds=0.0, break_it="truncated")
        write_version(repo, 4, prefix="v4:", thresholds=0.0, break_it="manifest")
        deadline = time.monotonic() + 30
        while True:
            index = {e["version"]: e for e in c.post("/v2/repository/index").json()}
            if all(index.get(v, {}).get("state") == "UNAVAILABLE" and not index[v]["reason"].startswith("not loaded")
                   for v in "234"):
                break
            assert time.monotonic() < deadline, (index, s.output())
            time.sleep(0.1)
        time.sleep(1.0)  # later scans: the refusals stand, nothing is retried until the folders change
        traffic.wait_count(100)
        responses = traffic.stop()
        assert len(responses) >= 100 and {st for st, _ in responses} == {200}
        assert {behaviour(b) for _, b in responses} == {v1}

        assert index["1"]["state"] == "READY"
        assert all(index[v]["state"] == "UNAVAILABLE" for v in "234")
        assert "stages.1.sha256" in index["2"]["reason"]
        assert "cannot be loaded" in index["3"]["reason"]
        assert "teacher" in index["4"]["reason"] and "required" in index["4"]["reason"].lower()
        samples = scrape(c)
        for v in "234":
            assert metric(samples, "reskd_model_refused", model=NAME, version=v) == 1
            assert metric(samples, "reskd_model_loads_total", model=NAME, version=v, result="refused") == 1
        log = s.output()
        assert all(f"refused {NAME} version {v}" in log for v in "234")
        r = c.post(f"/v1/models/{NAME}/versions/3/classify", files=[("file", ("a.png", IMAGES[0]))])
        assert r.status_code == 404 and "refused" in r.json()["error"]
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]

        write_version(repo, 3, prefix="v3:", thresholds=0.0)  # fixed: served at the next scan
        deadline = time.monotonic() + 20
        while c.get(f"/v2/models/{NAME}").json()["versions"] != ["1", "3"]:
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.1)
        samples = scrape(c)
        assert metric(samples, "reskd_model_refused", model=NAME, version="3") == 0
        assert metric(samples, "reskd_model_refused", model=NAME, version="2") == 1


def triton_client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_explicit_load_through_tritonclient_under_load(repo, workers):
    write_version(repo, 2, prefix="v2:", thresholds=0.0)
    with ServerProcess(repo=repo, workers=workers, model_control="explicit", auth_token=TOKEN) as s, \
            s.client(headers=AUTH) as c:
        tc = triton_client(s.url)
        index = tc.get_model_repository_index(headers=AUTH)
        assert [(e["version"], e["state"]) for e in index] == [("1", "READY"), ("2", "READY")]
        # A new version on disk is not served until it is loaded.
        write_version(repo, 3, prefix="v3:", thresholds=0.0)
        v1, v2 = reference(c, 1), reference(c, 2)
        index = {e["version"]: e for e in tc.get_model_repository_index(headers=AUTH)}
        assert index["3"]["state"] == "UNAVAILABLE" and index["3"]["reason"] == "not loaded"
        with pytest.raises(InferenceServerException, match="credentials"):
            tc.load_model(NAME)

        traffic = Traffic(s.url, headers=spread(workers, AUTH))
        traffic.wait_for(lambda status, body: status == 200)
        time.sleep(0.5)
        assert {b["version"] for rs in traffic.results for _, b in rs} == {2}
        tc.load_model(NAME, headers=AUTH)  # answers once version 3 is verified, warmed and serving
        assert tc.is_model_ready(NAME, "3", headers=AUTH)
        traffic.wait_for(lambda status, body: status == 200 and body["version"] == 3)
        time.sleep(0.5)
        v3 = reference(c, 3)
        check_switch(traffic, {"v2:": (2, v2), "v3:": (3, v3)})
        assert v1 != v2 and v2[1] == v3[1]

        # A broken version: the load fails naming it; everything served before still is.
        write_version(repo, 4, prefix="v4:", thresholds=0.0, break_it="sha256")
        with pytest.raises(InferenceServerException, match="version 4.*sha256") as err:
            tc.load_model(NAME, headers=AUTH)
        assert "serving: 1, 2, 3" in str(err.value)
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "2", "3"]
        r = c.post(f"/v2/repository/models/{NAME}/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and "not supported" in r.json()["error"]
        r = c.post("/v2/repository/models/no-such-model/load")
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]
        # Names that are no model of the repository, whatever their length or bytes: 404, never a path built from
        # them (a name longer than the file system's 255 bytes once gave 500; an encoded "..", the parent folder).
        for bad in ("x" * 300, "é" * 200, "%2e%2e", "a%00b", "manifest.json"):
            for action in ("load", "unload"):
                r = c.post(f"/v2/repository/models/{bad}/{action}")
                assert r.status_code == 404 and "no model" in r.json()["error"], (bad, action, r.text)
                assert len(r.json()["error"]) < 600
        # Bodies that are not what the API takes: 400 saying what is wrong, and nothing changes.
        for path, body, says in [(f"/v2/repository/models/{NAME}/load", b"{not json", "invalid request body"),
                                 (f"/v2/repository/models/{NAME}/unload", b'{"parameters": {"force": true}}',
                                  "parameters.force"),
                                 (f"/v2/repository/models/{NAME}/unload",
                                  b'{"parameters": {"unload_dependents": "yes"}}', "unload_dependents"),
                                 ("/v2/repository/index", b'{"ready": "yes"}', "ready")]:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and says in r.json()["error"], (path, r.text)
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "2", "3"]


def test_unload_under_load_finishes_admitted_requests_then_answers_404(repo, workers):
    with ServerProcess(repo=repo, workers=workers, model_control="explicit") as s, s.client() as c:
        tc = triton_client(s.url)
        # several requests in flight at once
        traffic = Traffic(s.url, clients=4, images=noise_pngs(64, seed=1), headers=spread(workers))
        traffic.wait_for(lambda status, body: status == 200)
        time.sleep(1.0)
        tc.unload_model(NAME)
        assert not tc.is_model_ready(NAME)
        time.sleep(0.5)
        responses = traffic.stop()
        codes = [[st for st, _ in client] for client in traffic.results]
        for client in codes:  # each client: answers, then 404s; nothing else
            assert client == sorted(client, key=lambda st: st == 404) and set(client) <= {200, 404}, client
        assert sum(st == 200 for st, _ in responses) >= 10 and any(st == 404 for st, _ in responses)
        missing = next(b for st, b in responses if st == 404)
        assert f"'{NAME}'" in missing["error"] and "unloaded" in missing["error"]
        index = tc.get_model_repository_index()
        assert [(e["version"], e["state"], e["reason"]) for e in index] == [("1", "UNAVAILABLE", "unloaded")]
        assert tc.get_model_repository_index() and not [e for e in c.post(
            "/v2/repository/index", json={"ready": True}).json()]
        samples = scrape(c)
        assert metric(samples, "reskd_model_info", model=NAME) == 0
        assert metric(samples, "reskd_model_loads_total", model=NAME, version="1", result="unloaded") == 1
        assert "drained and stopped" in s.output()

        tc.load_model(NAME)  # and back
        r = c.post(CLASSIFY, files=[("file", ("a.png", IMAGES[0]))])
        assert r.status_code == 200 and r.json()["version"] == 1
