"""`reskd serve`: one server process (service/server.py), or a supervisor running several on one port
(service/supervisor.py, RESKD_WORKERS). The multi-process side builds on the single one, never the reverse."""

from __future__ import annotations

import logging
import logging.config

from .logs import log_config
from .rpc.server import claim_port
from .server import run_single
from .settings import ServeSettings
from .supervisor import Supervisor, listen_socket, worker_count


def serve(settings: ServeSettings) -> int:
    """Run `reskd serve` until signalled; -> the exit status. Raises ManifestError (a model that cannot load, named
    with its file), ValueError or RuntimeError before the port opens. Several workers (RESKD_WORKERS): the
    supervisor runs them."""
    check_audit_model(settings)
    # before any model is opened: a taken port fails at once; claimed until the server exits
    claim = claim_port(settings.host, settings.grpc_port) if settings.grpc_port else None
    try:
        config = log_config(settings.log_format, settings.log_level)
        logging.config.dictConfig(config)
        cuda = settings.device == "cuda" or (settings.device == "auto" and cuda_offered())
        count = worker_count(settings, cuda)
        if count > 1:
            sock = listen_socket(settings)
            try:
                return Supervisor(settings, count, cuda).run(sock)
            finally:
                sock.close()
        return run_single(settings, config)
    finally:
        if claim is not None:
            claim.close()


def check_audit_model(settings: ServeSettings) -> None:
    """RESKD_AUDIT_MODEL must name a version of the repository (ManifestError: `reskd serve` exits with status 2)."""
    if settings.audit_model is None:
        return
    from reskd.manifest import ManifestError, ModelRepository, parse_model_ref

    try:
        ModelRepository(settings.repo).resolve(*parse_model_ref(settings.audit_model))
    except ManifestError as err:
        raise ManifestError(f"RESKD_AUDIT_MODEL: {err}") from None


def cuda_offered() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
