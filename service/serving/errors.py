"""The errors a request can meet, in the protocol-neutral terms every front end shares.

A ServingError carries what went wrong in words the client can act on, and its outcome as an HTTP status code:
the common vocabulary of inference servers (KServe's and Triton's HTTP and gRPC protocols both describe errors
by it). The HTTP layer answers with it as is (service/rest/errors.py); the gRPC front end maps it to its own codes
(service/rpc/service.py).
Nothing here knows of FastAPI or a request object.
"""

from __future__ import annotations


class ServingError(Exception):
    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s  # when the client may try again (overload, loading, shutting down)


def bad_request(message: str) -> ServingError:
    return ServingError(400, message)


def not_found(message: str) -> ServingError:
    return ServingError(404, message)


def too_large(message: str) -> ServingError:
    return ServingError(413, message)


def unsupported(message: str) -> ServingError:
    return ServingError(415, message)


def invalid(message: str) -> ServingError:
    return ServingError(422, message)


def internal(message: str) -> ServingError:
    """The server failed (logged where it happened); the message says so without a stack trace."""
    return ServingError(500, message)


def deadline_exceeded(message: str) -> ServingError:
    """The request's deadline (its `timeout`) passed before its work could be done."""
    return ServingError(504, message)


def unavailable(message: str, retry_after_s: int | None = None) -> ServingError:
    return ServingError(503, message, retry_after_s)
