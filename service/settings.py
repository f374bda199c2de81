"""Server settings: defaults, then RESKD_* environment variables, then `reskd serve` flags (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reskd.manifest import MODEL_REF

# The bundled repository: models/ at the project root (an editable or source install).
BUNDLED_REPO = Path(__file__).resolve().parent.parent / "models"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESKD_", extra="forbid")

    repo: Path = Field(BUNDLED_REPO, description="model repository; every model and version in it is served")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The gRPC front end (service/rpc: KServe v2's inference.GRPCInferenceService and grpc.health.v1) on this port of
    # the same host; 0: off. It shares everything with HTTP: models, queues, limits, auth, metrics.
    grpc_port: int = Field(0, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    default_model: str = Field("fashion-mnist", description="the model POST /v1/classify uses")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line (log shippers)")

    # Limits (docs/design.md, "HTTP"). Anything smaller than an image's size limit is accepted and resized.
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="request body limit (413 above)")
    max_inflight_body_bytes: int = Field(256 * 1024 * 1024, gt=0, description="bytes of request bodies held at "
                                         "once, all requests together, gRPC's included (503 above); at least "
                                         "max_body_bytes")
    max_images: int = Field(256, gt=0, description="images per request (v1 parts or v2 batch; 413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="decoded pixels per image (413 above: decompression bomb)")
    max_request_pixels: int = Field(100_000_000, gt=0, description="decoded pixels per request, all its images "
                                    "together (413 above); read from the image headers before any decoding")

    # Scheduling (service/serving/scheduler.py): "stage" re-batches survivors per stage; "request" batches whole
    # requests (Triton's way); "none" runs each request alone; "auto" picks per device what measured best there
    # (docs/serving.md): stage on CPU, request on CUDA.
    scheduler: Literal["auto", "stage", "request", "none"] = "auto"
    # A batch closes at max_batch_size samples or max_queue_delay_ms after its oldest sample arrived. The
    # stage_* lists set them per stage (the last value repeats for deeper stages); unset, every stage uses these.
    max_batch_size: int = Field(64, gt=0)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    stage_max_batch_size: list[int] | None = None
    stage_max_queue_delay_ms: list[float] | None = None
    # Admission (service/serving/pipeline.py), before a request's body is read: 503 + Retry-After when the images
    # already admitted would keep a newcomer waiting over max_queue_wait_ms at the rate the model answers while busy (0:
    # off), or when a stage queue holds max_queue_images (bounded memory; a request larger than that gets 413).
    # The wait limit is the latency bound under overload: set it to what a client may wait before its work starts.
    max_queue_wait_ms: float = Field(250.0, ge=0)
    max_queue_images: int = Field(1024, gt=0)
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503")
    # Degrade, don't refuse (service/serving/degrade.py): under load a version with stored operating points runs
    # the requests that leave their exit settings to the server at a cheaper point, down to degrade_max_drop_pt
    # below its default point's validation accuracy, before admission refuses any. The controller moves down once
    # the expected queue wait passes half of latency_slo_ms and back up after the load has stayed low for
    # degrade_hold_s. latency_slo_ms (unset: max_queue_wait_ms, or 250 when that is off) must not exceed
    # max_queue_wait_ms: the server degrades before it sheds. degrade=false: shed-only, as before.
    degrade: bool = True
    latency_slo_ms: float | None = Field(None, gt=0)
    degrade_hold_s: float = Field(5.0, gt=0)
    degrade_max_drop_pt: float = Field(1.0, ge=0, le=100)

    # The shadow audit (service/serving/audit.py): this share of the answers given before a version's last stage is
    # re-run through its audit model (its own fallback stage, else the version its manifest names, else
    # audit_model), after the response and on spare capacity only, within audit_max_compute_pct of the FLOPs the
    # version serves (more is dropped and counted). 0 turns it off. audit_model (NAME:VERSION of the repository) is
    # for versions whose manifest names no audit model or teacher.
    audit_fraction: float = Field(0.002, ge=0, le=1)
    audit_max_compute_pct: float = Field(2.0, gt=0, le=10000)
    audit_model: str | None = Field(None, pattern=MODEL_REF)

    # One thread budget: `inference_threads` stage batches run at once (the pipeline depth), each with
    # `intra_op_threads` onnxruntime threads. 0 = auto: two batches at once (one on a single core), each with half
    # the cores (service/serving/models.py thread_budget says why).
    inference_threads: int = Field(0, ge=0)
    intra_op_threads: int = Field(0, ge=0, description="0: cores / inference_threads")
    decode_workers: int = Field(2, gt=0, description="threads decoding and preprocessing images")
    warmup_batch_sizes: list[int] = Field([1, 8, 64], description="CPU: batch sizes run once per stage before ready")

    # The engine (reskd/engine.py). "bound" (the CUDA default): images uploaded once per stage-0 batch and kept
    # on the device (IO binding) in buffers allocated once; later stages gather their rows there; batches are
    # padded to these bucket sizes, every stage and bucket warmed at start; with cuda_graphs each (stage, bucket)
    # is a captured CUDA graph. "host" (the CPU default): numpy, exact batch sizes. "bound" on CPU runs the
    # device path without a GPU (tests). The largest bucket must hold the largest batch the scheduler can form:
    # the max batch size; under the request-level policies max_images too (`reskd serve` checks it at start).
    stage_runner: Literal["auto", "host", "bound"] = "auto"
    cuda_graphs: bool | None = Field(None, description="CUDA graphs for the bound engine; unset: on under CUDA")
    batch_buckets: list[int] = Field([1, 2, 4, 8, 16, 32, 64, 128, 256])
    max_gather_blocks: int = Field(8, gt=0, description="stage-0 batches one later-stage batch may draw from")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"

    # Connections (service/rest/connections.py). A connection that sends nothing for keep_alive_s (new or between
    # requests) is closed; a request's headers must arrive within header_timeout_s of its first byte and its body
    # within body_timeout_s of its headers (408 otherwise). At max_connections the oldest connection not running a
    # request is closed to admit a new one; with none such the new one gets 503 (the process's file-descriptor limit
    # is never reached, so health checks and scrapes still get through).
    # 75 s (nginx's keep-alive): longer than the idle time after which clients' pools drop a connection (httpx 5 s,
    # aiohttp 15 s) and load balancers' idle timeouts (60 s), so the client or proxy closes an idle connection first.
    # At 5 s, httpx reused connections the server was closing that very moment: a request now and then got no
    # response (1 of 2,836 in bench/overload.py, seen twice).
    keep_alive_s: float = Field(75.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1000, gt=0)
    # Shutdown on SIGTERM: readiness answers 503 at once, the listener stays open drain_s more (load balancers and
    # Kubernetes endpoints stop sending meanwhile; responses then say `Connection: close`), then it closes and
    # in-flight requests get shutdown_timeout_s to finish. A deployment's grace period must exceed the sum.
    # SIGINT (Ctrl-C) skips the drain window; a second signal exits at once.
    drain_s: float = Field(5.0, ge=0)
    shutdown_timeout_s: float = Field(20.0, ge=0)

    # Model control, as Triton's --model-control-mode (service/serving/control.py). "none": every version in the
    # repository is loaded at start, a broken one stops the server (status 2), later changes need a restart. "poll": the
    # repository is scanned every repository_poll_s seconds and on SIGHUP; new and changed versions are verified
    # and warmed, then take traffic; removed ones are drained and unloaded; a broken one is refused and whatever
    # served before goes on. "explicit": the same, on request: POST /v2/repository/models/{name}/load|unload.
    # Under poll and explicit a version that fails at start is refused, not fatal.
    model_control: Literal["none", "poll", "explicit"] = "none"
    repository_poll_s: float = Field(15.0, gt=0, description="poll: seconds between repository scans")

    # Server processes sharing the port (service/supervisor.py): each one a whole server with its own event loop,
    # sessions, schedulers and the limits above; metrics are aggregated (any worker's /metrics shows them all) and
    # model control is coordinated (every worker switches versions together). 0 = auto: one per GPU under CUDA;
    # on CPU one per available core, at most 8. docs/serving.md, "Workers", says how to size it.
    workers: int = Field(0, ge=0)

    # Bearer-token auth on inference and model endpoints; health, /metrics and docs stay open. Unset: off.
    auth_token: SecretStr | None = None

    @model_validator(mode="after")
    def _one_body_fits_the_budget(self):
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"RESKD_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes:,}) must be at least "
                             f"RESKD_MAX_BODY_BYTES ({self.max_body_bytes:,}): a body under the limit could never be "
                             f"read")
        return self

    @model_validator(mode="after")
    def _degrade_before_shedding(self):
        if self.latency_slo_ms is None:
            self.latency_slo_ms = self.max_queue_wait_ms or 250.0
        elif self.max_queue_wait_ms and self.latency_slo_ms > self.max_queue_wait_ms:
            raise ValueError(f"RESKD_LATENCY_SLO_MS ({self.latency_slo_ms:g}) must not exceed "
                             f"RESKD_MAX_QUEUE_WAIT_MS ({self.max_queue_wait_ms:g}): the server degrades when the "
                             f"expected wait passes half the objective and sheds at the wait limit, so a limit "
                             f"below the objective would refuse requests it could still answer at a cheaper point; "
                             f"raise RESKD_MAX_QUEUE_WAIT_MS or lower the objective")
        return self

    @model_validator(mode="after")
    def _two_ports(self):
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"RESKD_GRPC_PORT ({self.grpc_port}) is RESKD_PORT too: gRPC needs a port of its own "
                             f"(Triton's convention: HTTP 8000, gRPC 8001)")
        return self

    @field_validator("port", "grpc_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value, info: ValidationInfo):
        if isinstance(value, str) and value.startswith("tcp://"):
            var = f"RESKD_{info.field_name.upper()}"
            service = "reskd" if info.field_name == "port" else "reskd-grpc"
            raise ValueError(f"{value!r} is a Kubernetes service link, not a port: a Service named {service!r} sets "
                             f"{var} in every pod of its namespace; set enableServiceLinks: false in the pod "
                             f"spec (deploy/k8s does) or {var} explicitly")
        return value
