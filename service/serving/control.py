"""Model control: which versions of the repository are served, and changing that under traffic (Triton's model
control modes, RESKD_MODEL_CONTROL).

- none: every version is loaded at start; one that cannot load stops the server (status 2). Nothing changes after.
- poll: the repository is scanned every RESKD_REPOSITORY_POLL_S seconds and on SIGHUP.
- explicit: Triton's repository API: POST /v2/repository/models/{name}/load (scan that model's folder) and
  .../unload (stop serving it).
Under poll and explicit a version that cannot load, at start or later, is refused (the reason in the log, the
index and reskd_model_refused) while everything else is served.

A scan compares each version folder with what was loaded from it (its fingerprint: the manifest's bytes and every
file's size and mtime). A new or changed version is verified (manifest fields, sha256 of every file, a session per
stage), warmed up and checked (every stage gives finite logits of the right shape) before it takes traffic; then
it replaces the routing entry in one step on the event loop. Requests resolve their version once, so those already
on the old one finish on it: the old one is drained (until it holds no request, at most RESKD_SHUTDOWN_TIMEOUT_S)
and then stopped. A version whose folder is gone is drained and unloaded the same way. A refused version is not
tried again until its folder changes (poll) or it is loaded explicitly.

A scan runs in two steps: prepare (look at the folders; verify, open and warm what is new or changed, not yet
routed to) and apply (route to the prepared versions, refuse, drain, in one step on the event loop). With several
worker processes (service/supervisor.py) the supervisor runs both: it has every worker prepare, checks that all saw the
same folders (else it aborts and tries again), refuses everywhere a version any worker refused, and then applies
the change everywhere at once through a shared generation number: each worker applies it before it routes its next
request, so no client gets an older version after a newer one from any worker. Polls, SIGHUP and the repository API
all go through the supervisor then.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reskd.manifest import MANIFEST, ManifestError, load_manifest, sha256_file
from reskd.runtime import CascadeRuntime

from .metrics import Metrics
from .models import ModelStore, ServedModel
from ..settings import ServeSettings

log = logging.getLogger("reskd.service")

Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]]
POLL_INTERVAL_IDLE_S = 0.01  # how often a drain looks whether its version still holds requests


def shown(name: str) -> str:
    """A client's model name as an error message quotes it: at most 64 characters of it."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


def fingerprint(folder: Path) -> Fingerprint:
    """What a version folder holds: the manifest's sha256, every file's name, size and mtime. Raises OSError while
    the folder is being changed (a file gone between listing and reading)."""
    manifest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            files.append((p.name, st.st_size, st.st_mtime_ns))
    return manifest, tuple(files)


def same_bytes(folder: Path, loaded: Fingerprint | None, now: Fingerprint) -> bool:
    """Whether a version folder whose fingerprint moved from `loaded` to `now` still holds the bytes that were
    loaded: the same manifest, the same files and sizes, and every file whose mtime moved is a stage file that still
    matches the manifest's sha256 (it matched at load). A rollout tool that copies identical files over, or a
    `touch`, then costs no reload. Reads the touched files; run it off the event loop."""
    if loaded is None or loaded[0] != now[0]:
        return False
    before = {name: (size, mtime) for name, size, mtime in loaded[1]}
    after = {name: (size, mtime) for name, size, mtime in now[1]}
    if before.keys() != after.keys():
        return False
    touched = [name for name in after if after[name] != before[name]]
    if any(after[name][0] != before[name][0] for name in touched):
        return False
    try:
        hashes = {stage.file: stage.sha256 for stage in load_manifest(folder, verify_files=False).stages}
        return all(name in hashes and sha256_file(folder / name) == hashes[name] for name in touched)
    except (OSError, ManifestError):
        return False


class Refused(Exception):
    """A version that failed verification, loading, warm-up or its output check: the message says why."""


def warm_and_check(runtime: CascadeRuntime, batch_sizes: list[int]) -> None:
    """Warm a version up (its engine's warm-up) and check each stage's output: logits [2, classes], finite, for
    zero images. Raises Refused naming the stage. Runs in the inference thread, like the version's batches."""
    try:
        runtime.engine.warm_up(batch_sizes)
    except Exception as err:
        raise Refused(f"warm-up failed: {type(err).__name__}: {err}") from err
    images = np.zeros((2, *runtime.input_shape), np.float32)
    for stage, spec in enumerate(runtime.manifest.stages):
        try:
            logits = runtime.stage_logits(stage, images)
        except Exception as err:
            raise Refused(f"stage {stage} ({spec.file}) failed on a test batch: {type(err).__name__}: {err}") from err
        if logits.shape != (2, runtime.num_classes):
            raise Refused(f"stage {stage} ({spec.file}) gives logits of shape {list(logits.shape)} for 2 images; the "
                          f"manifest's {runtime.num_classes} labels need [2, {runtime.num_classes}]")
        if not np.isfinite(logits).all():
            raise Refused(f"stage {stage} ({spec.file}) gives NaN or infinite logits for zero images")


@dataclass
class Refusal:
    fingerprint: Fingerprint | None
    reason: str


@dataclass
class Opened:
    """A version verified and opened (a session per stage), not yet warmed up or served."""
    name: str
    version: int
    runtime: CascadeRuntime
    fingerprint: Fingerprint


@dataclass
class Change:
    """What a scan found in one model's folder: versions prepared (verified, warmed, scheduler started, not routed
    to), refused, unchanged but refused before, and gone; and what the folder held."""
    name: str
    on_disk: dict[int, Fingerprint]
    loads: list[ServedModel] = field(default_factory=list)
    refusals: dict[int, tuple[Fingerprint, str]] = field(default_factory=dict)
    known_refused: dict[int, str] = field(default_factory=dict)
    gone: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        """What the supervisor compares across workers (picklable)."""
        return {"on_disk": self.on_disk, "loaded": [m.version for m in self.loads],
                "refused": {**self.known_refused, **{v: why for v, (_, why) in self.refusals.items()}}}


class ControlError(Exception):
    """A repository request model control cannot carry out, said so the client can act on it. The kinds below are
    answered by every front end alike (service/serving/repository.py)."""


class WrongMode(ControlError):
    """The request needs another RESKD_MODEL_CONTROL."""


class UnknownModel(ControlError):
    """The repository holds no such model."""


class LoadRefused(ControlError):
    """Versions of the model could not be loaded (the others are served)."""


class ControlUnavailable(ControlError):
    """The change could not be carried out now (no worker serving, the folders changing meanwhile); try again."""


class Coordinator(Protocol):
    """A worker's line to its supervisor (service/link.py): who this worker is, and the requests the supervisor
    carries out in every worker. request raises a ControlError."""

    index: int  # 0 counts model loads
    generation: Any  # multiprocessing.Value: the model change every worker applies before routing a request
    unloaded: set[str]  # models unloaded through the API before this worker started
    restarted: bool  # a worker started again

    def attach(self, loop: Any, control: ModelControl, lost: Any) -> None:
        """Serve the supervisor's commands to `control` from now on; lost() runs on `loop` if it goes away."""

    async def request(self, kind: str, name: str) -> Any: ...

    def mark_warm(self) -> None:
        """This worker's models are warm (its first warm-up is done)."""

    def cold_workers(self) -> list[int]:
        """The workers of this server whose first warm-up has not finished."""


class ModelControl:
    def __init__(self, settings: ServeSettings, store: ModelStore, metrics: Metrics, inference: Executor,
                 coordinator: Coordinator | None = None, generation=None, leader: bool = True,
                 unloaded: set[str] | None = None, restarted: bool = False):
        """coordinator, generation (a shared integer, multiprocessing.Value): set in a worker of several; the
        supervisor then decides every change. leader: this process counts model loads (worker 0). unloaded: models
        unloaded through the API before this worker started, not loaded at start; restarted: a worker started
        again, whose start loads nothing the server did not serve already (not counted)."""
        self.settings = settings
        self.mode = settings.model_control
        self.store = store
        self.metrics = metrics
        self.inference = inference
        self.coordinator = coordinator
        self.generation = generation
        self.leader = leader
        self.restarted = restarted  # until its start is over: what it serves then is no new load
        self.pending: tuple[int, Any] | None = None  # (generation, what to apply), decided by the supervisor
        self.prepared: list[Change] = []
        self.unloading: list[asyncio.Task] = []
        self.refused: dict[tuple[str, int], Refusal] = {}
        self.unloaded: set[str] = set()  # explicit: models unloaded through the API (the index says so)
        self.draining: dict[ServedModel, asyncio.Task] = {}
        self.draining_stops: set[asyncio.Task] = set()  # prepared versions discarded, being stopped
        self.loading: set[tuple[str, int]] = set()
        self._lock = asyncio.Lock()  # one change of the routing table at a time
        self._rescan = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._warned: set[Path] = set()
        self.opened: list[Opened] = []  # by open_all, served by start
        self.opened_all = False
        for name in unloaded or ():
            self.unloaded.add(name)
            self.store.absent[(name, None)] = self._unloaded_reason(name)

    @property
    def strict(self) -> bool:
        """none: a version that cannot load stops the server, as before model control existed."""
        return self.mode == "none"

    # --- start ---------------------------------------------------------------------------------------------
    def open_all(self) -> None:
        """Before the port opens: verify and open every version (not yet warmed, not yet served). Raises
        ManifestError for the first version that cannot load under `none`; refuses it otherwise."""
        self.opened_all = True
        names = self.store.repo.models()
        if not names and self.strict:
            raise ManifestError(f"model repository {self.store.repo.root} holds no model versions")
        if not names:
            log.warning("model repository %s holds no model versions yet (RESKD_MODEL_CONTROL=%s: they are served "
                        "once they appear)", self.store.repo.root, self.mode)
        self._warn_unfinished()
        for name in names:
            if name in self.unloaded:
                continue
            for version in self.store.repo.versions(name):
                try:
                    fp = fingerprint(self.store.repo.root / name / str(version))
                    runtime = self.store.open(name, version)
                except (ManifestError, RuntimeError, OSError) as err:
                    if self.strict:
                        raise
                    self._refuse(name, version, None, str(err))
                    continue
                self.opened.append(Opened(name, version, runtime, fp))

    async def start(self) -> None:
        """Warm up and check every version open_all opened, then serve it; under poll, start scanning. Raises
        Refused under `none` for a version that fails."""
        opened, self.opened = self.opened, []
        try:
            for o in opened:
                try:
                    self._serve(await self._activate(o))
                except Refused as err:
                    if self.strict:
                        raise
                    self._refuse(o.name, o.version, o.fingerprint, str(err))
        finally:
            self.restarted = False
        if self.mode == "poll" and self.coordinator is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository poll")

    def rescan(self) -> None:
        """SIGHUP: scan now (poll); otherwise only logged."""
        if self.coordinator is not None:
            log.info("SIGHUP to a worker ignored: send it to the supervisor (the `reskd serve` process)")
        elif self.mode == "poll":
            log.info("SIGHUP: scanning the model repository")
            self._rescan.set()
        else:
            log.info("SIGHUP ignored: RESKD_MODEL_CONTROL=%s (poll scans the repository on SIGHUP)", self.mode)

    async def stop(self) -> None:
        """Shutdown: no more scans; versions still draining are stopped (the served ones are stopped by the
        caller)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        self.abort()
        for model, task in list(self.draining.items()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await model.scheduler.stop()
        await asyncio.gather(*self.draining_stops, return_exceptions=True)

    # --- scans ---------------------------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._rescan.wait(), self.settings.repository_poll_s)
            except TimeoutError:
                pass
            self._rescan.clear()
            try:
                await self.scan()
            except Exception:  # the next scan tries again; serving goes on
                log.exception("scanning the model repository failed")

    async def scan(self, names: list[str] | None = None, force: bool = False) -> dict[int, str]:
        """Bring the served versions of `names` (default: every model on disk or served) in line with the
        repository: load new and changed versions, drain and unload removed ones. force: try refused versions
        again even if unchanged. -> {version: reason} for the versions refused by this scan (one model's
        versions when names has one name)."""
        async with self._lock:
            changes = await self._prepare_all(names, force)
            refused = {}
            for change in changes:
                refused.update(self._apply(change))
            return refused

    async def _prepare_all(self, names: list[str] | None, force: bool) -> list[Change]:
        if names is None:
            self._warn_unfinished()
            names = sorted(set(self.store.repo.models()) | set(self.store.names()))
        changes = []
        try:
            for name in names:
                changes.append(await self._prepare(name, force))
        except BaseException:
            self._discard(changes)
            raise
        return changes

    async def _prepare(self, name: str, force: bool) -> Change:
        """Look at a model's folder and prepare what changed: new and changed versions verified, opened, warmed and
        checked (not routed to), the refused ones with their reasons."""
        folder = self.store.repo.root / name
        on_disk = {}
        for version in self.store.repo.versions(name):
            try:
                on_disk[version] = fingerprint(folder / str(version))
            except OSError as err:  # changing right now: the next scan sees it settled
                log.info("%s version %d is changing (%s); trying again at the next scan", name, version, err)
        served = {v: self.store.get(name, v) for v in self.store.versions(name)}
        change = Change(name, on_disk, gone=sorted(set(served) - set(on_disk)))
        try:
            for version, fp in sorted(on_disk.items()):
                current = served.get(version)
                if current is not None and current.fingerprint == fp:
                    continue
                if current is not None and await asyncio.to_thread(same_bytes, folder / str(version),
                                                                   current.fingerprint, fp):
                    current.fingerprint = fp  # the same bytes, touched or copied over: nothing to load
                    continue
                known = self.refused.get((name, version))
                if known is not None and known.fingerprint == fp and not force:
                    change.known_refused[version] = known.reason
                    continue
                self.loading.add((name, version))
                try:
                    change.loads.append(await self._load(name, version, fp))
                except Refused as err:
                    change.refusals[version] = (fp, str(err))
                finally:
                    self.loading.discard((name, version))
        except BaseException:
            self._discard([change])
            raise
        return change

    def _apply(self, change: Change, refuse: dict[int, str] | None = None) -> dict[int, str]:
        """Route to a change's prepared versions, refuse its refused ones (and those in `refuse`: version ->
        reason, decided by the supervisor), drain the gone ones; on the event loop, with no await, so requests see
        the change at once. -> {version: reason} of the versions refused."""
        name, refuse = change.name, refuse or {}
        for version in change.gone:
            self._retire(self.store.remove(name, version, "its folder was removed from the repository"),
                         "was removed from the repository", unloaded=True)
        for key in [k for k in self.refused if k[0] == name and k[1] not in change.on_disk]:
            self._clear_refusal(*key)
        refused = dict(change.known_refused)
        for version, (fp, reason) in change.refusals.items():
            self._refuse(name, version, fp, reason, replaced=version in self.store.versions(name))
            refused[version] = reason
        for model in change.loads:
            reason = refuse.get(model.version)
            if reason is not None:  # another worker refused it: refused everywhere
                self._discard_model(model)
                self._refuse(name, model.version, model.fingerprint, reason,
                             replaced=model.version in self.store.versions(name))
                refused[model.version] = reason
                continue
            old = self._serve(model)
            log.info("%s version %d %s: serving it", name, model.version, "changed" if old else "is new")
            if old is not None:
                self._retire(old, "was replaced by a new load of the same version", unloaded=False)
        return refused

    def _discard(self, changes: list[Change]) -> None:
        for change in changes:
            for model in change.loads:
                self._discard_model(model)

    def _discard_model(self, model: ServedModel) -> None:
        """A prepared version never routed to: stop its scheduler (it holds no request)."""
        task = asyncio.get_running_loop().create_task(model.scheduler.stop("it was not served"))
        self.draining_stops.add(task)
        task.add_done_callback(self.draining_stops.discard)

    # --- a worker of several: the supervisor's side of a change (service/supervisor.py) -------------------------
    async def prepare(self, names: list[str] | None, force: bool) -> dict[str, dict]:
        """Prepare a scan; -> each model's summary. Applied later by decide + the generation, or discarded by
        abort."""
        self.abort()
        async with self._lock:
            self.prepared = await self._prepare_all(names, force)
        return {c.name: c.summary() for c in self.prepared}

    def abort(self) -> None:
        self._discard(self.prepared)
        self.prepared = []

    def decide(self, generation: int, refuse: dict[str, dict[int, str]]) -> None:
        """What the prepared scan applies once the shared generation reaches `generation`."""
        changes, self.prepared = self.prepared, []
        self.pending = (generation, lambda: [self._apply(c, refuse.get(c.name)) for c in changes])

    def decide_unload(self, generation: int, name: str) -> None:
        self.pending = (generation, lambda: self.unloading.extend(t for t in self._unload_now(name) if t))

    def sync(self) -> None:
        """Apply the change the supervisor decided, once its generation is published: called before a request
        resolves its model, and when the supervisor says so. A no-op in a single process."""
        if self.pending is not None and self.generation is not None and self.generation.value >= self.pending[0]:
            (_, apply), self.pending = self.pending, None
            apply()

    async def finish_unload(self) -> None:
        tasks, self.unloading = self.unloading, []
        await asyncio.gather(*tasks)

    def live(self) -> list[tuple[str, int, Any, bool]]:
        """(model, version, manifest, routed) of every version served or still draining: what its metrics
        describe."""
        rows = {(m.name, m.version): (m.name, m.version, m.manifest, True) for m in self.store.all()}
        for m in self.draining:
            rows.setdefault((m.name, m.version), (m.name, m.version, m.manifest, False))
        return list(rows.values())

    async def _load(self, name: str, version: int, fp: Fingerprint) -> ServedModel:
        """Verify, open, warm up and check a version off the event loop; -> it, running but not yet served."""
        start = time.perf_counter()
        try:
            runtime = await asyncio.to_thread(self.store.open, name, version)
        except (ManifestError, RuntimeError) as err:
            raise Refused(str(err)) from err
        except Exception as err:
            raise Refused(f"{name} version {version} cannot be loaded: {type(err).__name__}: {err}") from err
        model = await self._activate(Opened(name, version, runtime, fp))
        log.info("%s version %d verified and warmed in %.2f s", name, version, time.perf_counter() - start)
        return model

    async def _activate(self, o: Opened) -> ServedModel:
        """Warm an opened version up and check it in the inference thread, then give it its metrics and a started
        scheduler. Raises Refused naming the version."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.inference, warm_and_check, o.runtime,
                                                             self.settings.warmup_batch_sizes)
        except Refused as err:
            raise Refused(f"{o.name} version {o.version}: {err}") from err
        model = self.store.make(o.name, o.version, o.runtime, o.fingerprint)
        model.scheduler.start()
        return model

    def _serve(self, model: ServedModel) -> ServedModel | None:
        """Route to `model` from now on; -> the version it replaces (to be drained), if any."""
        old = self.store.put(model)
        self.unloaded.discard(model.name)
        self._clear_refusal(model.name, model.version)
        self._count(model.name, model.version, "loaded")
        return old

    def _count(self, name: str, version: int, result: str) -> None:
        if self.leader and not self.restarted:
            self.metrics.model_loads.labels(name, str(version), result).inc()

    # --- the repository API (explicit) ---------------------------------------------------------------------
    def _explicit_only(self, what: str) -> None:
        if self.mode != "explicit":
            raise WrongMode(f"{what} needs RESKD_MODEL_CONTROL=explicit (this server runs with {self.mode!r}"
                              + (": it picks up repository changes itself" if self.mode == "poll" else "") + ")")

    async def load(self, name: str) -> None:
        """POST .../load: scan the model's folder now (new, changed and removed versions; refused ones tried
        again). Raises 404 for a model the repository does not hold, 400 naming each version refused (the others
        are served)."""
        self._explicit_only("loading a model")
        if not self.store.repo.versions(name):
            raise UnknownModel(f"no model {shown(name)} in the model repository (models: "
                            f"{', '.join(self.store.repo.models()) or 'none'}); copy its version folder there first")
        if self.coordinator is not None:
            refused = await self.coordinator.request("load", name)
        else:
            refused = await self.scan([name], force=True)
        if refused:
            detail = "; ".join(f"version {v}: {why}" for v, why in sorted(refused.items()))
            served = self.store.versions(name)
            raise LoadRefused(f"failed to load {name!r}: {detail} (serving: "
                              f"{', '.join(map(str, served)) or 'no version'})")

    async def unload(self, name: str) -> None:
        """POST .../unload: stop routing to every version of the model at once (new requests get 404), then wait
        for their admitted requests to finish. Unloading a model that is not loaded does nothing; one the
        repository does not hold either is a 404."""
        self._explicit_only("unloading a model")
        if not self.store.versions(name) and not self.store.repo.versions(name):
            raise UnknownModel(f"no model {shown(name)} (served: {', '.join(self.store.names()) or 'none'})")
        if self.coordinator is not None:
            await self.coordinator.request("unload", name)
            return
        async with self._lock:
            tasks = self._unload_now(name)
        await asyncio.gather(*[t for t in tasks if t])

    @staticmethod
    def _unloaded_reason(name: str) -> str:
        return f"unloaded through the repository API; POST /v2/repository/models/{name}/load serves it again"

    def _unload_now(self, name: str) -> list[asyncio.Task | None]:
        """Stop routing to every version of `name`; -> their drain tasks."""
        why = self._unloaded_reason(name)
        tasks = [self._retire(self.store.remove(name, v, why), "was unloaded", unloaded=True)
                 for v in self.store.versions(name)]
        self.store.absent[(name, None)] = why
        self.unloaded.add(name)
        return tasks

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: each version on disk, served, refused or draining, with its state."""
        self.sync()
        entries: dict[tuple[str, int], tuple[str, str]] = {}
        repo = self.store.repo
        for name in repo.models():
            for v in repo.versions(name):
                if name in self.unloaded:
                    entries[(name, v)] = ("UNAVAILABLE", "unloaded")
                elif self.mode == "poll":
                    entries[(name, v)] = ("UNAVAILABLE", "not loaded yet: the next repository scan loads it")
                else:
                    entries[(name, v)] = ("UNAVAILABLE", "not loaded")
        for (name, v), refusal in self.refused.items():
            entries[(name, v)] = ("UNAVAILABLE", refusal.reason)
        for key in self.loading:
            entries[key] = ("LOADING", "being verified and warmed up")
        for model in self.draining:
            entries[(model.name, model.version)] = ("UNLOADING", "draining the requests it holds")
        for model in self.store.all():
            entries[(model.name, model.version)] = ("READY", "")
        rows = [{"name": n, "version": str(v), "state": st, "reason": why}
                for (n, v), (st, why) in sorted(entries.items())]
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    # --- refusals and drains -------------------------------------------------------------------------------
    def _refuse(self, name: str, version: int, fp: Fingerprint | None, reason: str, replaced: bool = False) -> None:
        self.refused[(name, version)] = Refusal(fp, reason)
        self._count(name, version, "refused")
        if replaced:
            log.error("refused %s version %d as it is now (%s); the version loaded before keeps serving", name,
                      version, reason)
        else:
            log.error("refused %s version %d: %s", name, version, reason)
            self.store.absent.setdefault((name, version), f"it was refused: {reason}")

    def _clear_refusal(self, name: str, version: int) -> None:
        if self.store.absent.get((name, version), "").startswith("it was refused"):
            del self.store.absent[(name, version)]
        self.refused.pop((name, version), None)

    def _retire(self, model: ServedModel | None, what: str, unloaded: bool) -> asyncio.Task | None:
        """Drain a version no longer routed to, then stop it (in the background; -> the task). what: what
        happened to it, for the log and for requests that outlive the drain."""
        if model is None:
            return None
        task = asyncio.get_running_loop().create_task(self._drain(model, what, unloaded),
                                                      name=f"drain {model.name}/{model.version}")
        self.draining[model] = task
        return task

    async def _drain(self, model: ServedModel, what: str, unloaded: bool) -> None:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        try:
            while not model.scheduler.idle and time.monotonic() < deadline:
                await asyncio.sleep(POLL_INTERVAL_IDLE_S)
            if not model.scheduler.idle:
                log.warning("%s version %d still held requests after %g s (RESKD_SHUTDOWN_TIMEOUT_S): they get 503",
                            model.name, model.version, self.settings.shutdown_timeout_s)
            await model.scheduler.stop(what)
        finally:
            self.draining.pop(model, None)
        if unloaded:
            self._count(model.name, model.version, "unloaded")
        if (model.name, model.version) not in {(m.name, m.version) for m in self.store.all()}:
            self.metrics.version_gone(model.name, model.version, model.runtime.num_stages)
        log.info("%s version %d %s: drained and stopped", model.name, model.version, what)

    def _warn_unfinished(self) -> None:
        for folder in self.store.repo.unfinished_versions():
            if folder not in self._warned:
                self._warned.add(folder)
                log.warning("%s is not served: it has no manifest.json (a version being copied in, or left empty; "
                            "copy the manifest last)", folder)
