"""One server process: the application (service/rest/app.py) under uvicorn, on its own port or, as one worker of
several, on the supervisor's socket; with RESKD_GRPC_PORT the gRPC front end (service/rpc) on the same event loop.

Start-up: every model is loaded (manifests, sha256 of every file, an onnxruntime session per stage) before the
port opens, so a broken model fails `reskd serve` at once with status 2 and a message naming it. The server then
answers liveness at once and turns ready after every model is warmed up. Connections are guarded
(service/rest/connections.py) and shutdown drains (Server).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from reskd.manifest import ManifestError

from .link import WorkerLink
from .rest.app import create_app
from .rest.connections import REFUSAL_MARGIN, ConnectionGuard
from .rpc.server import RpcServer
from .serving.decoding import release_large_allocations
from .serving.metrics import Metrics
from .serving.models import ServingDevice, engine_spec
from .serving.state import ServerState
from .settings import ServeSettings

log = logging.getLogger("reskd.service")

def connection_guard(settings: ServeSettings, metrics: Metrics, max_connections: int) -> ConnectionGuard:
    return ConnectionGuard(keep_alive_s=settings.keep_alive_s, header_timeout_s=settings.header_timeout_s,
                           body_timeout_s=settings.body_timeout_s, max_connections=max_connections,
                           retry_after_s=settings.retry_after_s,
                           on_close=lambda reason: metrics.connections_closed.labels(reason).inc(),
                           on_count=metrics.connections.set)


def connection_budget(wanted: int) -> int:
    """Connections this process can hold: the file-descriptor soft limit is raised to the hard one, and the
    connection limit kept under it with room for the refusal margin, model files, logs and the pools."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError):
        return wanted
    room = soft - REFUSAL_MARGIN - 128
    if wanted > room:
        log.warning("RESKD_MAX_CONNECTIONS=%d is over what %d file descriptors allow: using %d", wanted, soft,
                    max(room, 1))
        return max(room, 1)
    return wanted


class Server(uvicorn.Server):
    """uvicorn's server with reskd's shutdown (ServeSettings.drain_s): on SIGTERM readiness fails at once while the
    listener stays open drain_s longer; then uvicorn's own shutdown closes the listener and idle connections and
    gives in-flight requests shutdown_timeout_s. SIGINT skips the drain window. A second signal exits at once.
    Exit status 0, or 2 when the models failed to load or warm up."""

    def __init__(self, config: uvicorn.Config, state: ServerState, rpc: RpcServer | None = None):
        super().__init__(config)
        self.state = state
        self.rpc = rpc  # the gRPC front end (RESKD_GRPC_PORT), started and stopped with HTTP
        self.drain_until: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_status = 0
        state.on_failure = self.fail
        state.on_lost = lambda: self.handle_exit(signal.SIGTERM, None)

    def fail(self) -> None:
        self.exit_status = 2
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutting down, so the process would die of it (status 143)
        # instead of exiting 0.
        if self.should_exit or self.drain_until is not None:
            log.info("second signal: exiting now")
            self.should_exit = self.force_exit = True
            return
        # A signal handler runs between two bytecodes of the main thread, maybe inside a metric update holding
        # prometheus_client's lock (one lock for every value in a worker of several): the gauge is set on the loop.
        self.state.draining = True
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.state.drain)
        else:  # not serving signals (a server in a thread): called on the loop
            self.state.drain()
        drain_s = self.state.settings.drain_s
        if sig == signal.SIGTERM and drain_s > 0:
            log.info("SIGTERM: not ready from now on; the listener closes in %g s (RESKD_DRAIN_S)", drain_s)
            self.drain_until = time.monotonic() + drain_s
        else:
            self.should_exit = True

    @contextmanager
    def capture_signals(self):
        """uvicorn's SIGINT/SIGTERM handling, and SIGHUP: a repository scan under RESKD_MODEL_CONTROL=poll, logged
        and ignored otherwise (it used to kill the process)."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        loop = self._loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGHUP, lambda sig, frame: loop.call_soon_threadsafe(
            self.state.control.rescan))
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.rpc is not None and not self.should_exit:
            # After the app's start-up: a restarted worker (service/supervisor.py) takes gRPC calls only once warm,
            # as it does HTTP connections.
            try:
                await self.rpc.start()
            except RuntimeError as err:
                log.error("%s: stopping", err)
                self.exit_status = 2
                self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        """gRPC stops with the HTTP listener: new calls refused, those in progress given shutdown_timeout_s as HTTP's
        requests are; the application (models, pools) stops after both."""
        if self.rpc is None:
            return await super().shutdown(sockets)
        stopping = asyncio.ensure_future(self.rpc.stop(0 if self.force_exit else
                                                       self.state.settings.shutdown_timeout_s))
        stop_app = self.lifespan.shutdown

        async def after_rpc() -> None:
            await stopping
            await stop_app()

        self.lifespan.shutdown = after_rpc
        try:
            await super().shutdown(sockets)
        finally:
            await stopping

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            log.info("drain window over: closing the listener; in-flight requests get %g s (RESKD_SHUTDOWN_TIMEOUT_S)",
                     self.state.settings.shutdown_timeout_s)
            self.should_exit = True
        return await super().on_tick(counter)


def run_single(settings: ServeSettings, config: dict) -> int:
    """`reskd serve` as one process: open every version, then serve until signalled; -> the exit status. Raises
    ManifestError, ValueError or RuntimeError before the port opens."""
    # Raises under --device cuda without the CUDA EP. One onnxruntime thread pool for every stage of every model:
    # the thread budget, with no idle pool spinning; it must exist before the first session.
    serving = ServingDevice.resolve(settings, shared_pool=True)
    app, state = _open(settings, serving)
    _warn_default_model(settings, state)
    return _run(settings, app, state, config)


def run_worker(settings: ServeSettings, link: WorkerLink, sock: socket.socket, cores: int, config: dict) -> int:
    """One worker of several: open every version, tell the supervisor, and serve on its socket once told to."""
    try:
        serving = ServingDevice.resolve(settings, shared_pool=True, cores=cores)
        app, state = _open(settings, serving, link)
    except (ManifestError, ValueError, RuntimeError) as err:
        link.send(("opened", False, str(err)))
        return 2
    link.send(("opened", True, None))
    try:
        go = link.conn.recv()
    except (EOFError, OSError):
        return 0
    if go[0] != "go":
        return 0
    if link.index == 0 and not link.restarted:
        _warn_default_model(settings, state)
    return _run(settings, app, state, config, sock)


def _open(settings: ServeSettings, serving: ServingDevice, link: WorkerLink | None = None) -> tuple[FastAPI, ServerState]:
    engine_spec(settings, serving.device)  # raises ValueError for buckets that cannot hold a batch
    release_large_allocations()
    app = create_app(settings, serving, link)
    state: ServerState = app.state.reskd
    # Every manifest, sha256 and ONNX file is checked and every session created before the port opens; warm-up
    # runs after, with liveness answering meanwhile.
    state.control.open_all()
    return app, state


def _warn_default_model(settings: ServeSettings, state: ServerState) -> None:
    if settings.default_model not in {m.name for m in state.control.opened}:
        log.warning("default model %r is not in %s: POST /v1/classify will answer 404", settings.default_model,
                    settings.repo)


def _run(settings: ServeSettings, app: FastAPI, state: ServerState, config: dict,
         sock: socket.socket | None = None) -> int:
    guard = connection_guard(settings, state.metrics, connection_budget(settings.max_connections))
    uv = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=config, log_level=settings.log_level,
                        timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=settings.shutdown_timeout_s)
    uv.load()
    uv.http_protocol_class = guard.protocol(uv.http_protocol_class)
    rpc = RpcServer(state, shared_port=sock is not None) if settings.grpc_port else None
    server = Server(uv, state, rpc)
    server.run(sockets=[sock] if sock is not None else None)
    return server.exit_status
