"""Several server processes on one port (RESKD_WORKERS > 1): one event loop per process, so the HTTP work that
bounds a single process (parsing, decoding, responses; docs/serving.md, "HTTP overhead") spreads over the cores.

The supervisor (the `reskd serve` process) binds the port and starts the workers (spawned, not forked: no
onnxruntime state is shared). Each worker is a whole server (service/server.py) with its own sessions, schedulers,
pools and limits, and its share of the cores (or its own GPU under CUDA). They accept connections from the one
listening socket: a busy worker accepts less.

- Start: every worker verifies and opens every version; the port is listened on only once all have (a broken
  model stops `reskd serve` with status 2 before, as with one process). Warm-up and readiness follow per worker.
- Metrics: one multiprocess folder for all (service/serving/metrics.py): any worker's /metrics shows the whole server.
- Model control: the supervisor polls (RESKD_MODEL_CONTROL=poll, and on SIGHUP) and carries out the repository API
  requests a worker receives; each change is prepared in every worker, checked to be the same everywhere, and
  applied everywhere at once (service/serving/control.py). A worker's end of the line is service/link.py.
- Signals: SIGTERM and SIGINT go to every worker (each drains as a single server does); a second one makes them
  exit at once. A worker that dies is started again (its counters are kept); one that fails its first start stops
  the server with status 2. A worker whose supervisor is gone shuts itself down.
"""

from __future__ import annotations

import itertools
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from reskd.machine import available_cores, visible_gpus

from .link import WorkerLink
from .logs import log_config
from .serving.control import ControlError, ControlUnavailable
from .settings import ServeSettings

log = logging.getLogger("reskd.service")

CHANGE_TIMEOUT_S = 600.0  # a worker's part of a model change (loading and warming versions) before it counts as hung
CHANGE_ATTEMPTS = 5  # scans that saw the folders differ between workers (being written) are tried again this often
RESTART_DELAYS_S = (0.5, 1, 2, 5, 10, 30)  # between restarts of a worker that keeps dying


MAX_AUTO_WORKERS = 8  # each worker holds every model: memory grows with the count


def worker_count(settings: ServeSettings, cuda: bool) -> int:
    """RESKD_WORKERS, or auto (0): one per visible GPU under CUDA; on CPU one per available core, at most
    MAX_AUTO_WORKERS (docs/serving.md, "Workers": one process's event loop serves about one core's worth of HTTP
    work, so a single process left the second of 2 cores half idle under single-image load)."""
    if settings.workers:
        return settings.workers
    if cuda:
        return max(1, len(visible_gpus()))
    return min(available_cores(), MAX_AUTO_WORKERS)


def worker_main(settings: ServeSettings, index: int, sock: socket.socket, conn, generation, cores: int,
                gpu: str | None, unloaded: set[str], restarted: bool, warm=None) -> None:
    """A worker process: open every version, report, wait for the go, then serve on the shared socket."""
    os.setpgrp()  # Ctrl-C reaches the supervisor only, which passes it on once
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before onnxruntime is imported
    config = log_config(settings.log_format, settings.log_level, worker=index)
    logging.config.dictConfig(config)
    from .server import run_worker  # imports onnxruntime

    link = WorkerLink(index, conn, generation, set(unloaded), restarted, warm)
    sys.exit(run_worker(settings, link, sock, cores, config))


def listen_socket(settings: ServeSettings) -> socket.socket:
    """The port the workers share: bound here, listened on by the workers once they are ready. Raises
    RuntimeError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as err:
        sock.close()
        raise RuntimeError(f"cannot bind {settings.host}:{settings.port}: {(err.strerror or str(err)).lower()}")
    sock.set_inheritable(True)
    return sock


# --- the supervisor --------------------------------------------------------------------------------------------
class WorkerGone(Exception):
    pass


@dataclass
class Worker:
    index: int
    process: Any
    conn: Any
    started: float
    going: bool = False  # told to serve
    reaped: bool = False  # its exit has been handled


class Supervisor:
    def __init__(self, settings: ServeSettings, count: int, cuda: bool):
        self.settings = settings
        self.count = count
        self.gpus = visible_gpus() if cuda else []
        self.cores = max(1, available_cores() // count)
        self.ctx = multiprocessing.get_context("spawn")
        self.generation = self.ctx.Value("Q", 0, lock=False)
        # One flag per worker, set once its models are warm: readiness waits for every worker's first warm-up, so
        # a probe answered by a warm worker does not send traffic to one still warming on the shared port.
        self.warm = self.ctx.Array("b", count, lock=False)
        self.workers: dict[int, Worker] = {}
        self.unloaded: set[str] = set()
        self.backlog: list[tuple[Worker, tuple]] = []
        self.ids = itertools.count(1)
        self.stopping: int | None = None  # the signal that asked to stop
        self.rescan = False
        self.status = 0
        self.restarts: dict[int, int] = {}

    # -- life cycle
    def run(self, sock: socket.socket) -> int:
        self.sock = sock
        metrics_dir = tempfile.mkdtemp(prefix="reskd-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the workers inherit it; read before any metric
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for i in range(self.count):
                self._spawn(i)
            if not self._first_start():
                return 2 if self.stopping is None else 0
            log.info("%d workers serving on %s:%d (pids %s), %d core(s) each%s", self.count, self.settings.host,
                     self.settings.port, ", ".join(str(w.process.pid) for w in self.workers.values()), self.cores,
                     f", GPUs {', '.join(self.gpus)}" if self.gpus else "")
            self._supervise()
            return self.status
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for w in self.workers.values():
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _spawn(self, index: int, restarted: bool = False) -> None:
        parent, child = self.ctx.Pipe()
        gpu = self.gpus[index % len(self.gpus)] if self.gpus else None
        process = self.ctx.Process(target=worker_main, name=f"reskd-worker-{index}", daemon=False,
                                   args=(self.settings, index, self.sock, child, self.generation, self.cores, gpu,
                                         set(self.unloaded), restarted, self.warm))
        process.start()
        child.close()
        self.workers[index] = Worker(index, process, parent, time.monotonic())

    def _first_start(self) -> bool:
        """Wait until every worker has opened every version; False (everything stopped, the reason printed) when
        one could not."""
        for w in list(self.workers.values()):
            try:
                message = self._receive(w, lambda m: m[0] == "opened", timeout=None)
            except WorkerGone:
                message = ("opened", False, f"worker {w.index} exited with {w.process.exitcode} while loading")
            if not message[1]:
                if self.stopping is None:
                    print(f"reskd serve: {message[2]}", file=sys.stderr)
                for other in self.workers.values():
                    self._tell(other, ("quit",))
                    other.process.join(30)
                return False
        for w in self.workers.values():
            self._go(w)
        return True

    def _go(self, w: Worker) -> None:
        self._tell(w, ("go",))
        w.going = True

    def _signal(self, sig: int, frame) -> None:
        if sig == signal.SIGHUP:
            self.rescan = True
            return
        self.stopping = sig  # a second one reaches the workers as theirs: they exit at once
        for w in self.workers.values():
            if w.process.is_alive():
                try:
                    os.kill(w.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _supervise(self) -> None:
        poll = self.settings.model_control == "poll"
        next_scan = time.monotonic() + self.settings.repository_poll_s
        restart_at: dict[int, float] = {}
        while True:
            if self.stopping is not None and not any(w.process.is_alive() for w in self.workers.values()):
                return
            while self.backlog:
                self._handle(*self.backlog.pop(0))
            timeout = 0.5 if not poll else max(0.0, min(0.5, next_scan - time.monotonic()))
            waiting = [w.conn for w in self.workers.values() if not w.reaped]
            waiting += [w.process.sentinel for w in self.workers.values() if not w.reaped]
            ready = multiprocessing.connection.wait(waiting, timeout) if waiting else time.sleep(timeout) or []
            for w in list(self.workers.values()):
                if not w.reaped and w.conn in ready:
                    try:
                        self._handle(w, w.conn.recv())
                    except (EOFError, OSError):
                        pass  # its exit is seen below
                if not w.reaped and not w.process.is_alive():
                    w.reaped = True
                    when = self._exited(w)
                    if when is not None:
                        restart_at[w.index] = when
            if self.stopping is not None:
                continue
            for index, when in list(restart_at.items()):
                if time.monotonic() >= when:
                    del restart_at[index]
                    log.info("starting worker %d again", index)
                    self._spawn(index, restarted=True)
            if self.rescan:
                self.rescan = False
                if poll:
                    log.info("SIGHUP: scanning the model repository")
                    next_scan = 0.0
                else:
                    log.info("SIGHUP ignored: RESKD_MODEL_CONTROL=%s (poll scans the repository on SIGHUP)",
                             self.settings.model_control)
            if poll and time.monotonic() >= next_scan:
                try:
                    self._change_scan(None, force=False)
                except Exception as err:  # the next scan tries again; serving goes on
                    log.error("scanning the model repository failed: %s", err)
                next_scan = time.monotonic() + self.settings.repository_poll_s

    def _exited(self, w: Worker) -> float | None:
        """A worker's process ended: -> when to start it again (None: not again)."""
        from prometheus_client import multiprocess

        code = w.process.exitcode
        multiprocess.mark_process_dead(w.process.pid)  # its live gauges go; its counters stay
        w.conn.close()
        if self.stopping is not None:
            if code not in (0, None) and self.status == 0:
                self.status = code if code > 0 else 0
            return None
        if code == 2:  # a model that failed to warm up: as a single server, stop with status 2
            log.error("worker %d (pid %d) exited with status 2 (see its log): stopping the server", w.index,
                      w.process.pid)
            self.status = 2
            self._signal(signal.SIGTERM, None)
            return None
        n = self.restarts.get(w.index, 0)
        if time.monotonic() - w.started > 60:
            n = 0
        self.restarts[w.index] = n + 1
        delay = RESTART_DELAYS_S[min(n, len(RESTART_DELAYS_S) - 1)]
        log.error("worker %d (pid %d) died (%s); starting it again in %g s", w.index, w.process.pid,
                  f"signal {-code}" if code is not None and code < 0 else f"status {code}", delay)
        return time.monotonic() + delay

    # -- messages
    def _tell(self, w: Worker, message: tuple) -> None:
        try:
            w.conn.send(message)
        except (OSError, ValueError):
            pass

    def _receive(self, w: Worker, wanted, timeout: float | None) -> tuple:
        """The next message from `w` that wanted() accepts; others wait in the backlog. Raises WorkerGone,
        TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and remaining == 0.0:
                raise TimeoutError(f"worker {w.index} did not answer within {timeout:g} s")
            try:
                if not w.conn.poll(remaining if remaining is not None else 1.0):
                    if not w.process.is_alive():
                        raise WorkerGone(f"worker {w.index} exited")
                    continue
                message = w.conn.recv()
            except (EOFError, OSError) as err:
                raise WorkerGone(f"worker {w.index} exited") from err
            if wanted(message):
                return message
            self.backlog.append((w, message))

    def _handle(self, w: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "opened":  # a restarted worker
            if message[1]:
                self._go(w)
            else:
                log.error("worker %d could not start: %s", w.index, message[2])
                self._tell(w, ("quit",))
        elif kind == "request":
            _, rid, what, name = message
            try:
                if what == "load":
                    value = self._change_scan([name], force=True).get(name, {})
                else:
                    self._change_unload(name)
                    value = None
                reply = ("reply", rid, True, value)
            except ControlError as err:
                reply = ("reply", rid, False, (type(err).__name__, str(err)))
            except Exception as err:
                log.error("%s of %r failed: %s", what, name, err)
                reply = ("reply", rid, False, (ControlUnavailable.__name__,
                                               f"{what} of {name!r} failed in a worker ({err}); try again"))
            self._tell(w, reply)
        # "done" messages of a change that timed out or was given up arrive late: dropped

    def _serving(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.going and w.process.is_alive()]

    def _call_all(self, workers: list[Worker], kind: str, *args, timeout: float = CHANGE_TIMEOUT_S) -> list:
        cid = next(self.ids)
        for w in workers:
            self._tell(w, (kind, cid, *args))
        results, failures = [], []
        for w in workers:
            try:
                _, _, ok, value = self._receive(w, lambda m: m[0] == "done" and m[1] == cid, timeout)
            except (WorkerGone, TimeoutError) as err:
                failures.append(str(err))
                continue
            if ok:
                results.append(value)
            else:
                failures.append(f"worker {w.index}: {value}")
        if failures:
            raise RuntimeError("; ".join(failures))
        return results

    # -- model changes, in every worker at once (service/serving/control.py)
    def _change_scan(self, names: list[str] | None, force: bool) -> dict[str, dict[int, str]]:
        """Prepare the scan in every worker; if all saw the same folders, apply it everywhere with the refusals
        of any; -> {model: {version: reason}} of the refused versions."""
        for attempt in range(CHANGE_ATTEMPTS):
            workers = self._serving()
            if not workers:
                raise ControlUnavailable("no worker is serving right now; try again")
            try:
                summaries = self._call_all(workers, "prepare", names, force)
            except RuntimeError:
                self._abort(workers)
                raise
            seen = [{name: s["on_disk"] for name, s in summary.items()} for summary in summaries]
            if any(s != seen[0] for s in seen[1:]):
                log.info("the workers saw the repository differ (being written?): trying again")
                self._abort(workers)
                time.sleep(0.2 * (attempt + 1))
                continue
            refused: dict[str, dict[int, str]] = {}
            for summary in summaries:
                for name, s in summary.items():
                    for version, why in s["refused"].items():
                        refused.setdefault(name, {}).setdefault(version, why)
            self._publish(workers, "decide", refused)
            for summary in summaries[:1]:
                for name, s in summary.items():
                    if set(s["loaded"]) - set(refused.get(name, {})):
                        self.unloaded.discard(name)
            return refused
        raise ControlUnavailable("the model repository kept changing while the workers read it; try again when it "
                                 "is written")

    def _change_unload(self, name: str) -> None:
        workers = self._serving()
        self._publish(workers, "decide_unload", name)
        self.unloaded.add(name)
        self._call_all(workers, "finish_unload")

    def _publish(self, workers: list[Worker], kind: str, arg) -> None:
        """Every worker holds the change for the next generation; publishing the number makes each apply it before
        its next request; then they are told to apply it now (a worker with no request meanwhile)."""
        generation = self.generation.value + 1
        self._call_all(workers, kind, generation, arg)
        self.generation.value = generation
        self._call_all(workers, "apply")

    def _abort(self, workers: list[Worker]) -> None:
        try:
            self._call_all(workers, "abort", timeout=60)
        except RuntimeError as err:
            log.error("discarding a prepared model change failed: %s", err)
