"""A worker's line to its supervisor (service/supervisor.py), when `reskd serve` runs several worker processes:
commands come down (the steps of a model change, service/serving/control.py), requests go up (the repository API's
load and unload, which the supervisor carries out in every worker). A WorkerLink is the Coordinator a worker's
model control works with."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .serving.control import ControlError, ControlUnavailable

log = logging.getLogger("reskd.service")

# The refusals a supervisor sends back by name, raised again in the worker that asked.
ERRORS: dict[str, type[ControlError]] = {e.__name__: e for e in ControlError.__subclasses__()}


@dataclass
class WorkerLink:
    """A worker's line to the supervisor: commands come down (model changes), requests go up (the repository
    API's load and unload, which the supervisor carries out in every worker)."""

    index: int
    conn: Any  # multiprocessing Connection
    generation: Any  # multiprocessing.Value: the model change every worker applies before routing a request
    unloaded: set[str] = field(default_factory=set)
    restarted: bool = False  # warm up before taking connections: the other workers answer meanwhile
    warm: Any = None  # multiprocessing.Array: one flag per worker, set once its models are warm (None: no flags)
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Any = field(default_factory=itertools.count)
    _waiting: dict[int, asyncio.Future] = field(default_factory=dict)

    def mark_warm(self) -> None:
        if self.warm is not None:
            self.warm[self.index] = 1

    def cold_workers(self) -> list[int]:
        """The workers whose first warm-up has not finished."""
        return [] if self.warm is None else [i for i, flag in enumerate(self.warm) if not flag]

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    def attach(self, loop: asyncio.AbstractEventLoop, control, lost) -> None:
        """Serve the supervisor's commands from now on (a thread); lost() runs on the loop if it goes away."""
        self.loop, self.control, self.lost = loop, control, lost
        threading.Thread(target=self._read, name="reskd-supervisor-link", daemon=True).start()

    async def request(self, kind: str, name: str) -> Any:
        """Ask the supervisor to load or unload a model in every worker; -> its answer. Raises a ControlError."""
        rid = next(self._ids)
        future = self.loop.create_future()
        self._waiting[rid] = future
        try:
            self.send(("request", rid, kind, name))
            ok, value = await future
        finally:
            self._waiting.pop(rid, None)
        if not ok:
            kind, message = value
            raise ERRORS.get(kind, ControlUnavailable)(message)
        return value

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                log.error("the supervisor is gone: shutting down")
                self.loop.call_soon_threadsafe(self.lost)
                # Whatever happens to that shutdown, this process does not outlive its supervisor for long.
                settings = self.control.settings
                watchdog = threading.Timer(settings.drain_s + settings.shutdown_timeout_s + 10, os._exit, (1,))
                watchdog.daemon = True
                watchdog.start()
                for future in list(self._waiting.values()):
                    gone = (ControlUnavailable.__name__, "the server is shutting down")
                    self.loop.call_soon_threadsafe(_settle, future, (False, gone))
                return
            if message[0] == "reply":
                _, rid, ok, value = message
                future = self._waiting.get(rid)
                if future is not None:
                    self.loop.call_soon_threadsafe(_settle, future, (ok, value))
                continue
            kind, cid, *args = message
            try:
                result = asyncio.run_coroutine_threadsafe(self._command(kind, *args), self.loop).result()
                self.send(("done", cid, True, result))
            except Exception as err:
                log.exception("model change %s failed in this worker", kind)
                self.send(("done", cid, False, f"{type(err).__name__}: {err}"))

    async def _command(self, kind: str, *args) -> Any:
        control = self.control
        if kind == "prepare":
            return await control.prepare(*args)
        if kind == "abort":
            return control.abort()
        if kind == "decide":
            return control.decide(*args)
        if kind == "decide_unload":
            return control.decide_unload(*args)
        if kind == "apply":
            return control.sync()
        if kind == "finish_unload":
            return await control.finish_unload()
        raise ValueError(f"unknown command {kind!r}")


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
