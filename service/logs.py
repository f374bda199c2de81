"""Logging of `reskd serve`: the server's own lines and uvicorn's, one format for both. `text` is for a terminal;
`json` (RESKD_LOG_FORMAT=json) writes one JSON object per line, with time, level, logger and message, for log
shippers."""

from __future__ import annotations

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(log_format: str, level: str, worker: int | None = None) -> dict:
    """A logging.config.dictConfig dict; uvicorn.run(log_config=...) applies it before the server starts. worker:
    the index of a worker of several (service/supervisor.py), in every line it writes."""
    if log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS

        formatter = {"()": "pythonjsonlogger.json.JsonFormatter",
                     "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s", "datefmt": "%Y-%m-%dT%H:%M:%S%z",
                     "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
                     # uvicorn adds its message again with terminal colours; a log shipper wants it once, plain.
                     "reserved_attrs": [*RESERVED_ATTRS, "color_message"]}
        if worker is not None:
            formatter["static_fields"] = {"worker": worker}
    else:
        formatter = {"format": TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(
            "%(name)s", f"[worker {worker}] %(name)s")}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {name: {"handlers": ["default"], "level": level, "propagate": False}
                    for name in ("reskd", "uvicorn", "uvicorn.error", "uvicorn.access")},
    }
