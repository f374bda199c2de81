"""The grpc.aio server of one server process, on its event loop (uvicorn's): the inference service and
grpc.health.v1 (SERVING while HTTP's readiness answers 200, for Kubernetes' gRPC probes and gRPC load balancers).

Options from the settings: messages up to RESKD_MAX_BODY_BYTES (larger: RESOURCE_EXHAUSTED, from grpcio itself, so
neither counted nor logged by reskd), responses unbounded, RESKD_MAX_CONNECTIONS calls in progress at once (the
service's own limit, counted 429 beyond; grpcio's, at BACKSTOP times that plus BACKSTOP_SLACK, only stops a flood
before any handler runs), connections idle for RESKD_KEEP_ALIVE_S closed (clients reconnect).
The port: taken by another socket, start-up fails (grpcio would otherwise share it through SO_REUSEPORT); the
workers of one server (RESKD_WORKERS) do share it that way, the kernel spreading connections over them, once the
supervisor has checked that nothing else holds it. Every server claims its port number from start to exit
(claim_port), so that no other one passes the check, and then shares the port, in the seconds before the workers
bind it."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ..serving.errors import ServingError
from ..serving.state import ServerState
from .protocol.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from .service import SERVICE, InferenceService

log = logging.getLogger("reskd.service")

HEALTH_POLL_S = 0.25
# grpcio's own limit on calls in progress: BACKSTOP times the service's (RESKD_MAX_CONNECTIONS) plus BACKSTOP_SLACK.
# Room for the probes and for the calls the service refuses (each counted), which grpcio counts as in progress until
# their refusal is sent: a burst that arrives at once needs that room however small the limit is (at 2 alone, grpcio
# refused the fifth call of a burst of five itself, uncounted). A flood far beyond is refused before any handler.
BACKSTOP = 2
BACKSTOP_SLACK = 64


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(host: str, port: int) -> None:
    """RuntimeError when host:port cannot be bound by a socket of its own (in use, or not an address here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"cannot bind the gRPC port {host}:{port} (RESKD_GRPC_PORT): "
                               f"{(err.strerror or str(err)).lower()}") from None


def claim_port(host: str, port: int) -> socket.socket | None:
    """Claim the gRPC port for this server, then check it as check_port does: the caller keeps the returned socket
    until the server exits. The claim is a Unix socket named after the port number in Linux's abstract namespace
    (per network namespace, like the port; gone with its process, so never stale; elsewhere no claim: None). It
    keeps a second `reskd serve` off the port number on any address, even in the seconds before this server's
    workers bind it with SO_REUSEPORT, which another server's workers could otherwise join. A bound socket would
    do that too, but a restart would then trip over the connections its predecessor left in TIME_WAIT.
    RuntimeError when claimed or taken."""
    claim = None
    if sys.platform == "linux":
        claim = socket.socket(socket.AF_UNIX)
        try:
            claim.bind(f"\0reskd-grpc-port-{port}")
        except OSError:
            claim.close()
            raise RuntimeError(f"cannot bind the gRPC port {host}:{port} (RESKD_GRPC_PORT): another reskd server "
                               f"on this machine serves gRPC on port {port}") from None
    try:
        check_port(host, port)
    except RuntimeError:
        if claim is not None:
            claim.close()
        raise
    return claim


class RpcServer:
    def __init__(self, state: ServerState, shared_port: bool):
        """shared_port: one worker of several on the port (SO_REUSEPORT)."""
        self.state = state
        self.shared_port = shared_port
        self.service = InferenceService(state)
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.watch: asyncio.Task | None = None

    async def start(self) -> None:
        """Bind and start serving. RuntimeError when the port cannot be bound."""
        s = self.state.settings
        options = [("grpc.max_receive_message_length", s.max_body_bytes), ("grpc.max_send_message_length", -1),
                   ("grpc.so_reuseport", 1 if self.shared_port else 0),
                   ("grpc.max_connection_idle_ms", int(s.keep_alive_s * 1000))]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=BACKSTOP * s.max_connections + BACKSTOP_SLACK)
        add_GRPCInferenceServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        where = address(s.host, s.grpc_port)
        try:
            server.add_insecure_port(where)
        except RuntimeError:
            await server.stop(None)
            raise RuntimeError(f"cannot bind the gRPC port {where} (RESKD_GRPC_PORT): in use, or not an address of "
                               f"this machine") from None
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server = server
        self.watch = asyncio.create_task(self._follow_readiness())
        log.info("gRPC (KServe v2, grpc.health.v1) on %s", where)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _follow_readiness(self) -> None:
        serving = health_pb2.HealthCheckResponse
        current = serving.NOT_SERVING
        while True:
            try:
                self.state.require_ready(readiness=True)
                status = serving.SERVING
            except ServingError:
                status = serving.NOT_SERVING
            if status != current:
                await self._set_health(status)
                current = status
            await asyncio.sleep(HEALTH_POLL_S)

    async def stop(self, grace_s: float | None) -> None:
        """New calls are refused at once; calls in progress get grace_s to finish, then are cancelled (counted
        503)."""
        if self.server is None:
            return
        if self.watch is not None:
            self.watch.cancel()
        await self.health.enter_graceful_shutdown()
        self.service.stopping = True
        await self.server.stop(grace_s)
