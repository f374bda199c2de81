"""A real `reskd serve` process on loopback for tests: started with RESKD_* settings, polled until ready, stopped
at the end. Its log is kept for failure messages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import lanes

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models"
# What the tests' servers serve unless a test says otherwise: the bundled repository's first versions (links to
# models/*/1), so what the tests assert about stages and exits does not move when a newer version is bundled.
# tests/test_bundled_model.py and tests/test_stage_inputs.py cover every bundled version.
MODELS = ROOT / "tests" / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, proc: subprocess.Popen, output, what: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200: a server that listens is not yet one that answers. Fails at once, with the
    process's output(), if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{output()}")


def wait_until_serving(target: str, failed, timeout: float = 60) -> None:
    """Poll grpc.health.v1 at `target` until it says SERVING (gRPC opens after HTTP); failed(): why the server is
    gone, or None while it runs."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            why = failed()
            if why is not None:
                raise RuntimeError(why)
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"gRPC at {target} not serving after {timeout} s:\n{failed() or ''}")


class Loopback:
    """A server on loopback at self.url, stopped at the end of a `with` block."""

    url: str

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError


class ServerProcess(Loopback):
    def __init__(self, wait_ready: bool = True, grpc: bool = False, **settings):
        """grpc: serve gRPC too, on a free port of its own (self.grpc: its target, host:port)."""
        lanes.require("server", "a `reskd serve` process")
        self.with_grpc = grpc
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RESKD_")}
        self.env.update({f"RESKD_{k.upper()}": str(v) for k, v in settings.items()})
        self.env.setdefault("RESKD_INTRA_OP_THREADS", "1")
        self.env.setdefault("RESKD_REPO", str(MODELS))
        # One process unless a test is about workers: the limits the tests check hold per worker.
        self.env.setdefault("RESKD_WORKERS", "1")
        # Off unless a test is about it: the wait-based admission reacts to the speed of a machine busy with tests.
        self.env.setdefault("RESKD_MAX_QUEUE_WAIT_MS", "0")
        self._start()
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:  # never entered a `with` block: nobody else would stop it
                self.stop()
                raise

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if self.with_grpc:
            grpc_port = free_port()
            self.env["RESKD_GRPC_PORT"] = str(grpc_port)
            self.grpc = f"127.0.0.1:{grpc_port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="reskd-serve-", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "reskd.cli", "serve", "--port", str(self.port),
                                      "--device", "cpu"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        """Everything the server has written; after stop(), everything it wrote."""
        if self.log.closed:
            return self.final_output
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 60) -> None:
        """The port was free when chosen; if another process took it before the server bound it, the server
        exits at once saying so, and is started again on another port."""
        for attempt in range(3):
            try:
                wait_until_ready(f"{self.url}/v2/health/ready", self.proc, self.output, "reskd serve", timeout)
                if self.with_grpc:
                    wait_until_serving(self.grpc, lambda: None if self.proc.poll() is None else
                                       f"reskd serve exited with {self.proc.returncode}:\n{self.output()}", timeout)
                return
            except RuntimeError:
                if attempt == 2 or self.proc.poll() is None or "address already in use" not in self.output():
                    raise
                self.log.close()
                self._start()

    def stop(self) -> None:
        children = children_of(self.proc.pid)  # workers (RESKD_WORKERS): none may outlive the server
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = wait_gone(children, 30)
        if not self.log.closed:
            self.final_output = self.output()
            self.log.close()
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes of the server left running after it stopped: {left}\n"
                                 f"{self.final_output[-3000:]}")


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rpartition(")")[2].split()[1] == str(pid):
                out.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (exited, waiting for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """-> those of pids still running after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def serve_settings_refused(**env: str) -> subprocess.CompletedProcess:
    """`reskd serve` on the bundled models with only `env`'s RESKD_* settings (none inherited) and a port it never
    gets to open: for settings it must refuse at start (status 2 and a message naming them)."""
    return subprocess.run([sys.executable, "-m", "reskd.cli", "serve", "--device", "cpu", "--port", "1"],
                          capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("RESKD_")}, **env})


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """/metrics parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


class InProcessServer(Loopback):
    """`create_app` under a real uvicorn server on loopback, in a thread of the test process, so a test can reach
    into the served models (e.g. to break one). The socket is bound before the server starts: no port race."""

    def __init__(self, grpc: bool = False, **settings):
        """grpc: the gRPC front end too, as `reskd serve` runs it (self.grpc: its target, host:port)."""
        import threading

        import uvicorn

        lanes.require("server", "an in-process uvicorn server")

        from reskd.service.rest.app import create_app
        from reskd.service.settings import ServeSettings

        grpc_port = free_port() if grpc else 0
        self.app = create_app(ServeSettings(**{"device": "cpu", "intra_op_threads": 1, "max_queue_wait_ms": 0,
                                               "repo": MODELS, "grpc_port": grpc_port, **settings}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning")
        if grpc:
            from reskd.service.rpc.server import RpcServer
            from reskd.service.server import Server

            state = self.app.state.reskd
            self.grpc = f"127.0.0.1:{grpc_port}"
            self.server = Server(config, state, RpcServer(state, shared_port=False))
        else:
            self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.app.state.reskd.ready:
            if self.app.state.reskd.failed or time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"in-process server not ready: {self.app.state.reskd.failed}")
            time.sleep(0.05)
        if grpc:
            try:
                wait_until_serving(self.grpc, lambda: None if self.thread.is_alive() else "the server stopped")
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
