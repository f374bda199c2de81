"""The RPCs of `inference.GRPCInferenceService` over the serving layer, as HTTP's routes do them: the same checks,
messages, limits, admission, auth and metrics. Not implemented (UNIMPLEMENTED, grpcio's answer): ModelStreamInfer,
the shared-memory RPCs, TraceSetting and LogSettings.

Every RPC goes through `rpc`, which does for gRPC what HTTP's middlewares and error handlers do:
- auth: with RESKD_AUTH_TOKEN set, metadata `authorization: Bearer <token>` on every RPC but ServerLive and
  ServerReady (HTTP's /v2/health/*); UNAUTHENTICATED otherwise.
- errors: a ServingError leaves with its message and the gRPC code of its HTTP status (CODES); 503 carries its
  retry information as trailing metadata (`retry-after`: seconds, as HTTP's header; `grpc-retry-pushback-ms`, what
  gRPC's own retry policies read). An unexpected exception is logged and answered INTERNAL, no stack trace.
- cancellation: a call its client cancels has its work cancelled (its queued images dropped) and counts as 499,
  as an HTTP client that went away; one whose gRPC deadline passed, as 504; one the server's shutdown ended, 503.
- concurrency: at most RESKD_MAX_CONNECTIONS calls in progress (the probes aside); beyond, RESOURCE_EXHAUSTED with
  the retry metadata of a 503, counted 429. Their messages count against the process's budget of request bodies
  (RESKD_MAX_INFLIGHT_BODY_BYTES, shared with HTTP) until they are answered; over it, UNAVAILABLE with retry.
- metrics: reskd_requests_total{endpoint,code} and reskd_request_duration_seconds{endpoint} count every call with
  the method's path as its endpoint (/inference.GRPCInferenceService/ModelInfer) and the HTTP status of its outcome
  as its code (200 for OK), so one error-rate query covers both protocols; ModelInfer feeds the statistics
  extension as HTTP's infer does.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time

import grpc

from ..serving import describe, pipeline, repository
from ..serving.errors import ServingError, bad_request, not_found
from ..serving.state import ServerState
from ..serving.statistics import model_statistics
from ..serving.wire import clip
from . import codec
from .protocol import grpc_service_pb2 as pb
from .protocol.grpc_service_pb2_grpc import GRPCInferenceServiceServicer

log = logging.getLogger("reskd.service")

SERVICE = "inference.GRPCInferenceService"
OPEN = ("ServerLive", "ServerReady")  # as HTTP's /v2/health/*: open with auth on (probes)
C = grpc.StatusCode
CODES = {400: C.INVALID_ARGUMENT, 401: C.UNAUTHENTICATED, 404: C.NOT_FOUND, 413: C.RESOURCE_EXHAUSTED,
         415: C.INVALID_ARGUMENT, 422: C.INVALID_ARGUMENT, 429: C.RESOURCE_EXHAUSTED, 499: C.CANCELLED,
         500: C.INTERNAL, 503: C.UNAVAILABLE, 504: C.DEADLINE_EXCEEDED}
CLIENT_CANCELLED = 499
# The server's deadline is the client's as received (grpc-timeout counts from the headers' arrival), so the client
# gives up, and cancels the stream, a little before the server's deadline passes: a call cancelled this close to its
# deadline is taken as expired.
DEADLINE_SLACK_S = 0.1


class _Call:
    """What one call's metrics need besides its method and outcome: the model version it went to."""
    model: tuple[str, str] = ("", "")


def rpc(method):
    name = method.__name__
    endpoint = f"/{SERVICE}/{name}"

    @functools.wraps(method)
    async def handler(self: InferenceService, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        call = _Call()
        status = 500
        counted = False
        held = 0
        try:
            if name not in OPEN:
                if self.in_progress >= self.max_calls:
                    raise ServingError(429, f"the server has {self.max_calls} calls in progress, its limit "
                                            f"(RESKD_MAX_CONNECTIONS); retry shortly",
                                       self.state.settings.retry_after_s)
                self.in_progress += 1
                counted = True
                self._authorize(context)
                size = request.ByteSize()
                self.state.bodies.reserve(size)  # the 503 when over: nothing held then
                held = size
            response = await method(self, request, context, call)
            status = 200
            return response
        except ServingError as err:
            status = err.status
            trailers = () if err.retry_after_s is None else (
                ("retry-after", str(err.retry_after_s)), ("grpc-retry-pushback-ms", str(err.retry_after_s * 1000)))
            await context.abort(CODES.get(err.status, C.UNKNOWN), err.message, trailing_metadata=trailers)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            status = 503 if self.stopping else 504 if expired else CLIENT_CANCELLED
            raise
        except Exception as err:
            log.exception("unexpected error in %s", endpoint)
            await context.abort(C.INTERNAL, f"internal error ({type(err).__name__}); the server logged the details")
        finally:
            if counted:
                self.in_progress -= 1
            self.state.bodies.release(held)
            self._count(call.model, endpoint, status, time.perf_counter() - start, name == "ModelInfer")
    return handler


class InferenceService(GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state
        token = state.settings.auth_token
        self.token = None if token is None else token.get_secret_value().encode()
        self.stopping = False  # the server is stopping: calls it cancels count as 503
        # Calls in progress but ServerLive and ServerReady (probes; as the health service, never refused): beyond
        # max_calls a call is answered RESOURCE_EXHAUSTED and counted 429 (grpcio's own limit, further out, is only
        # a backstop: what it refuses is not counted).
        self.max_calls = state.settings.max_connections
        self.in_progress = 0

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.token is None:
            return
        header = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise ServingError(401, f"{'missing' if not header else 'invalid'} credentials: send metadata "
                                    f"'authorization: Bearer <token>' with the server's RESKD_AUTH_TOKEN")

    def _count(self, model: tuple[str, str], endpoint: str, status: int, seconds: float, inference: bool) -> None:
        metrics = self.state.metrics
        name, version = model[0], str(model[1])
        metrics.requests.labels(name, version, endpoint, str(status)).inc()
        metrics.request_duration.labels(name, version, endpoint).observe(seconds)
        if inference and name:
            metrics.inference_requests.labels(name, version, "success" if status == 200 else "fail").observe(seconds)

    def _model(self, name: str, version: str, call: _Call):
        model = self.state.model(name, version or None)
        call.model = (model.name, str(model.version))
        return model

    # --- health and metadata
    @rpc
    async def ServerLive(self, request, context, call):
        return pb.ServerLiveResponse(live=not self.state.failed)

    @rpc
    async def ServerReady(self, request, context, call):
        try:
            self.state.require_ready(readiness=True)
        except ServingError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    @rpc
    async def ModelReady(self, request, context, call):
        """Triton's answer: ready false, not an error, for a model that is not served (or a server not ready)."""
        try:
            self._model(request.name, request.version, call)
        except ServingError as err:
            if err.status not in (404, 503):
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context, call):
        return pb.ServerMetadataResponse(**describe.server_metadata())

    @rpc
    async def ModelMetadata(self, request, context, call):
        model = self._model(request.name, request.version, call)
        return codec.model_metadata(describe.model_metadata(model, self.state.store.versions(model.name)))

    @rpc
    async def ModelConfig(self, request, context, call):
        model = self._model(request.name, request.version, call)
        return codec.model_config(describe.model_config(model, self.state.settings))

    @rpc
    async def ModelStatistics(self, request, context, call):
        """Every served version (no name), a model's, or one version's, as HTTP's statistics routes."""
        state = self.state
        if not request.name:
            if request.version:
                raise bad_request("a version without a model name: name the model too, or neither")
            state.require_ready()
            state.control.sync()
            models = sorted(state.store.all(), key=lambda m: (m.name, m.version))
        elif request.version:
            models = [self._model(request.name, request.version, call)]
        else:
            first = self._model(request.name, "", call)
            models = [state.store.get(first.name, v) for v in state.store.versions(first.name)]
        return codec.model_statistics(model_statistics(state.metrics, [(m.name, m.version, m.runtime.num_stages)
                                                                       for m in models]))

    # --- the repository extension
    def _one_repository(self, name: str) -> None:
        if name:
            raise not_found(f"no model repository {clip(name)!r}: the server has one; leave repository_name "
                            f"empty")

    @rpc
    async def RepositoryIndex(self, request, context, call):
        self._one_repository(request.repository_name)
        return codec.repository_index(repository.index(self.state, request.ready))

    @rpc
    async def RepositoryModelLoad(self, request, context, call):
        self._one_repository(request.repository_name)
        await repository.load(self.state, request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context, call):
        self._one_repository(request.repository_name)
        unknown = sorted(set(request.parameters) - {"unload_dependents"})
        if unknown:
            raise bad_request(f"unload parameters other than unload_dependents are not supported (got "
                              f"{', '.join(unknown)})")
        await repository.unload(self.state, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference
    @rpc
    async def ModelInfer(self, request, context, call):
        state = self.state
        model = self._model(request.model_name, request.model_version, call)
        with pipeline.admit(state, model) as admission:
            start = time.perf_counter()
            deadline_s = context.time_remaining()  # the call's gRPC deadline is the request's
            if request.raw_input_contents:
                tensors = codec.input_tensors(request)
            else:  # typed contents can be large lists of numbers: converted off the event loop
                tensors = await state.decoding.run(lambda: codec.input_tensors(request))
            params = codec.infer_parameters(request)
            wanted = codec.requested_outputs(request)
            answer = await pipeline.infer(state, model, admission, tensors, params, wanted, start,
                                          deadline_s=deadline_s)
            start = time.perf_counter()
            response = codec.infer_response(model.name, model.version, request.id, answer)
            model.metrics.phase("output", time.perf_counter() - start)
            return response

