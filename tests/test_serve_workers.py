"""Several worker processes on one port (RESKD_WORKERS, service/supervisor.py), against a real `reskd serve` on
loopback: both workers answer, any worker's /metrics shows the whole server, a killed worker is replaced while the
other answers and its counts are kept, SIGTERM stops them all with status 0, a worker whose supervisor is gone stops
itself, and a broken model stops the start with status 2. Model control with two workers runs in
tests/test_serve_model_control.py (every test there runs with one process and with two workers)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from model_versions import CLASSIFY, IMAGES, NAME, write_version
from server_process import ServerProcess, metric, running, scrape

pytestmark = pytest.mark.server

ROUTE = "/v1/models/{name}/classify"
FILES = [("file", ("a.png", IMAGES[0], "image/png")), ("file", ("b.png", IMAGES[1], "image/png"))]


def worker_pids(s: ServerProcess) -> list[int]:
    found = re.search(r"workers serving on \S+ \(pids ([\d, ]+)\)", s.output())
    assert found, s.output()
    return [int(p) for p in found.group(1).split(", ")]


def classify_each_on_a_new_connection(url: str, n: int) -> list[httpx.Response]:
    out = []
    for _ in range(n):
        with httpx.Client(base_url=url, timeout=30) as c:  # a new connection: any worker may accept it
            out.append(c.post(CLASSIFY, files=FILES))
    return out


def answered_by(output: str) -> set[str]:
    """The workers whose access log shows a classify request."""
    return set(re.findall(rf"\[worker (\d)\] uvicorn.access: .*POST {CLASSIFY}", output))


def test_two_workers_answer_alike_and_any_workers_metrics_show_the_whole_server():
    with ServerProcess(workers=2) as s:
        responses = classify_each_on_a_new_connection(s.url, 40)
        assert {r.status_code for r in responses} == {200}
        assert len({r.content for r in responses}) == 1, "the workers answered the same images differently"
        assert answered_by(s.output()) == {"0", "1"}, "one worker took every connection"
        with ServerProcess(workers=1) as single, single.client() as c:
            assert c.post(CLASSIFY, files=FILES).content == responses[0].content

        scrapes = []
        for _ in range(12):
            with s.client() as c:  # a new connection each: both workers answer some scrapes
                scrapes.append(scrape(c))
        assert len(set(re.findall(r"\[worker (\d)\] uvicorn.access: .*GET /metrics", s.output()))) == 2
        for samples in scrapes:
            assert metric(samples, "reskd_images_total", model=NAME) == 80
            assert metric(samples, "reskd_requests_total", model=NAME, endpoint=ROUTE, code="200") == 40
            assert metric(samples, "reskd_request_duration_seconds_count", model=NAME, endpoint=ROUTE) == 40
            assert sum(metric(samples, "reskd_exits_total", model=NAME, stage=str(k)) for k in range(3)) == 80
            assert metric(samples, "reskd_ready") == 1  # every worker ready
            # Once per served version, however many workers serve it.
            assert metric(samples, "reskd_model_info", model=NAME, version="1") == 1
            assert metric(samples, "reskd_model_loads_total", model=NAME, version="1", result="loaded") == 1
            assert metric(samples, "reskd_inflight_requests", model=NAME) == 0
            assert metric(samples, "reskd_calibrated_compute_fraction", model=NAME) > 0


def test_readiness_waits_for_every_worker_while_a_warm_one_already_answers(tmp_path):
    """The rule the readiness probe follows in a worker of several: its own models warm is not enough, every
    worker's first warm-up must be done (the probe reaches any worker on the shared port)."""
    import multiprocessing

    from reskd.service.link import WorkerLink
    from reskd.service.serving.errors import ServingError
    from reskd.service.serving.models import ServingDevice
    from reskd.service.serving.state import ServerState
    from reskd.service.settings import ServeSettings

    ctx = multiprocessing.get_context("spawn")
    warm = ctx.Array("b", 2, lock=False)
    ours, _theirs = ctx.Pipe()
    link = WorkerLink(0, ours, ctx.Value("Q", 0, lock=False), set(), False, warm)
    settings = ServeSettings(device="cpu", repo=str(tmp_path))
    state = ServerState(settings, ServingDevice.resolve(settings), link)
    state.ready = True  # what state.start() sets once this worker's models are warm...
    link.mark_warm()  # ...and then this
    assert link.cold_workers() == [1]
    state.require_ready()  # requests that reach this worker are answered
    with pytest.raises(ServingError) as refused:
        state.require_ready(readiness=True)
    assert refused.value.status == 503 and "worker 1 of this server is still warming up" in str(refused.value)
    warm[1] = 1  # worker 1's state.start() finished
    state.require_ready(readiness=True)


def test_a_killed_worker_is_replaced_while_the_other_answers_and_its_counts_are_kept():
    with ServerProcess(workers=2) as s:
        first = classify_each_on_a_new_connection(s.url, 20)
        assert all(r.status_code == 200 for r in first), [(r.status_code, r.text[:200]) for r in first]
        pids = worker_pids(s)
        os.kill(pids[0], signal.SIGKILL)
        # While worker 0 is gone and then starting again, worker 1 answers every request (a restarted worker
        # listens only once warm).
        deadline = time.monotonic() + 30
        during = []
        while "starting worker 0 again" not in s.output() or "[worker 0] reskd.service: ready" not in \
                s.output().split("starting worker 0 again", 1)[1]:
            assert time.monotonic() < deadline, s.output()
            during += classify_each_on_a_new_connection(s.url, 1)
        assert during and {r.status_code for r in during} == {200}
        assert re.search(rf"worker 0 \(pid {pids[0]}\) died \(signal 9\)", s.output())
        after = classify_each_on_a_new_connection(s.url, 30)
        assert {r.status_code for r in after} == {200}
        assert answered_by(s.output().split("starting worker 0 again", 1)[1]) == {"0", "1"}
        with s.client() as c:
            samples = scrape(c)
        # The dead worker's requests still count: counters never go back (rate() sees no reset).
        total = 20 + len(during) + 30
        assert metric(samples, "reskd_requests_total", model=NAME, endpoint=ROUTE, code="200") == total
        assert metric(samples, "reskd_images_total", model=NAME) == 2 * total
        assert metric(samples, "reskd_ready") == 1
        # Worker 0 counts model loads; a restarted worker's start is no new load.
        assert metric(samples, "reskd_model_loads_total", model=NAME, version="1", result="loaded") == 1


def test_sigterm_stops_every_worker_with_status_0_and_workers_stop_without_their_supervisor():
    with ServerProcess(workers=2, drain_s=0.2) as s:
        pids = worker_pids(s)
        assert classify_each_on_a_new_connection(s.url, 4)[-1].status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.output()
        assert not any(running(p) for p in pids)
        assert "SIGTERM: not ready from now on" in s.output()

    with ServerProcess(workers=2) as s:
        pids = worker_pids(s)
        s.proc.kill()  # the supervisor dies without a word
        s.proc.wait()
        deadline = time.monotonic() + 30
        while any(running(p) for p in pids):
            assert time.monotonic() < deadline, f"workers left running without their supervisor:\n{s.output()}"
            time.sleep(0.1)
        assert "the supervisor is gone: shutting down" in s.output()
        with pytest.raises(httpx.ConnectError):  # nobody holds the port any more
            httpx.get(f"{s.url}/v2/health/live", timeout=2)


def test_a_broken_model_stops_the_start_with_status_2_before_the_port_is_used(tmp_path):
    write_version(tmp_path, 1, prefix="", thresholds=None)
    write_version(tmp_path, 2, prefix="", thresholds=None, break_it="truncated")
    s = ServerProcess(wait_ready=False, workers=2, repo=tmp_path)
    try:
        assert s.proc.wait(60) == 2, s.output()
        assert re.search(r"reskd serve: .*version 2 .*cannot be loaded", s.output()), s.output()
        assert "workers serving" not in s.output()
    finally:
        s.stop()


# --- how many workers, and their cores ------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu_max, cores", [("200000 100000\n", 2), ("150000 100000\n", 2), ("max 100000\n", None)])
def test_available_cores_follow_the_cgroup_quota(tmp_path, monkeypatch, cpu_max, cores):
    from reskd import machine

    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(machine, "CGROUP", tmp_path)
    affinity = len(os.sched_getaffinity(0))
    assert machine.available_cores() == (min(cores, affinity) if cores else affinity)


def test_available_cores_read_cgroup_v1_and_no_cgroup(tmp_path, monkeypatch):
    from reskd import machine

    monkeypatch.setattr(machine, "CGROUP", tmp_path)
    assert machine.available_cores() == len(os.sched_getaffinity(0))  # no cgroup file: the affinity mask
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert machine.available_cores() == 1


def test_worker_count_auto_and_explicit(monkeypatch):
    from reskd.service import supervisor as workers
    from reskd.service.settings import ServeSettings

    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    assert workers.worker_count(ServeSettings(), cuda=False) == 2
    monkeypatch.setattr(workers, "available_cores", lambda: 1)
    assert workers.worker_count(ServeSettings(), cuda=False) == 1
    monkeypatch.setattr(workers, "available_cores", lambda: 64)
    assert workers.worker_count(ServeSettings(), cuda=False) == workers.MAX_AUTO_WORKERS
    assert workers.worker_count(ServeSettings(workers=3), cuda=False) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert workers.worker_count(ServeSettings(), cuda=True) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert workers.worker_count(ServeSettings(), cuda=True) == 1


def test_bad_worker_settings_and_a_taken_port_stop_the_start_with_a_message(tmp_path):
    def serve(*args, **env):
        return subprocess.run([sys.executable, "-m", "reskd.cli", "serve", "--device", "cpu", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("RESKD_")}, **env})

    out = serve("--port", "1", RESKD_WORKERS="-1")
    assert out.returncode == 2 and "RESKD_WORKERS: Input should be greater than or equal to 0" in out.stderr, \
        out.stderr
    out = serve("--port", "1", "--workers", "two")
    assert out.returncode == 2 and "--workers: invalid int value: 'two'" in out.stderr, out.stderr
    with socket.socket() as taken:  # another process holds the port: no worker is started
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = serve("--port", str(taken.getsockname()[1]), "--workers", "2")
    assert out.returncode == 2 and "address already in use" in out.stderr, out.stderr
    assert "workers serving" not in out.stderr
