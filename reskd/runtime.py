"""The cascade runtime: onnxruntime + numpy, no torch. Calibration, serving, batch scoring and benchmarks all
execute a model repository version through this one class, so what is calibrated is exactly what is served.

A batch goes through the stages in order; each stage runs only on the samples still undecided, and
reskd.cascade decides, after each stage, which samples leave. A stage reads the images or named outputs of
earlier stages (the manifest's stage inputs): the runtime carries such an output for the samples that survive,
and only while a later stage still reads it. The stages execute on the version's engine
(reskd.engine: numpy on CPU; fixed device buffers, buckets and CUDA graphs on CUDA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cascade import CascadeInputError, CascadeResult, CascadeSamples, ExitRule, advance, combine
from .device import Device
from .engine import BoundEngine, EngineSpec, HostEngine, Part, Plan, images_part, make_engine
from .manifest import IMAGES, Manifest, ManifestError, load_manifest

StageHook = Callable[[int, int, float], None]
log = logging.getLogger("reskd")


class CascadeRuntime:
    def __init__(self, version_dir: str | Path, *, device: Device | None = None, check_folder_name: bool = True,
                 engine: EngineSpec | None = None):
        self.path = Path(version_dir)
        self.manifest: Manifest = load_manifest(self.path, check_folder_name=check_folder_name)
        self.device = device or Device.resolve()
        asked = engine or EngineSpec()
        self.engine_spec = asked.resolve(self.device)
        try:
            self.sessions = self._sessions(bool(self.engine_spec.graphs))
        except Exception as err:  # onnxruntime refuses graphs when a node is not placed on CUDA
            if not self.engine_spec.graphs or asked.graphs:
                raise
            log.warning("CUDA graphs unavailable for %s (%s); running it without", self.path, err)
            self.engine_spec = replace(self.engine_spec, graphs=False)
            self.sessions = self._sessions(False)
        self.stage_flops = np.asarray(self.manifest.stage_flops, dtype=np.int64)
        self.cum_flops = np.cumsum(self.stage_flops)
        m = self.manifest.input
        self.input_shape = (m.channels, m.height, m.width)
        self.num_classes = len(self.manifest.labels)
        self.rule = ExitRule(self.manifest.exit.measure, len(self.manifest.stages), self.manifest.stage_combine)
        self.plan = Plan.of(self.manifest)
        self._check_graphs()
        self.engine: HostEngine | BoundEngine = make_engine(self.engine_spec, self.device, self.sessions, self.plan,
                                                           self.num_classes)

    def _check_graphs(self) -> None:
        """Each stage's ONNX graph has the inputs and outputs its manifest entry declares, of the declared sizes
        (the batch axis aside): a mismatch is found when the version is opened, not on a request."""
        for i, (stage, session) in enumerate(zip(self.manifest.stages, self.sessions)):
            where = f"{self.path}: stages.{i} ({stage.file})"
            graph_inputs = {x.name: x.shape for x in session.get_inputs()}
            if set(graph_inputs) != {x.name for x in stage.inputs}:
                raise ManifestError(f"{where}: the graph's inputs are {sorted(graph_inputs)}, the manifest declares "
                                    f"{sorted(x.name for x in stage.inputs)}")
            graph_outputs = {x.name: x.shape for x in session.get_outputs()}
            declared = {"logits": [len(self.manifest.labels)], **{o.name: o.shape for o in stage.outputs}}
            missing = sorted(set(declared) - set(graph_outputs))
            if missing:
                raise ManifestError(f"{where}: the graph has no output {', '.join(missing)} (it has "
                                    f"{', '.join(sorted(graph_outputs))})")
            # the carried tensors' sizes (images and logits are checked on every batch and at warm-up)
            wanted = {**{x.name: list(self.manifest.source_shape(x.source)) for x in stage.inputs
                         if x.source != IMAGES}, **{o.name: o.shape for o in stage.outputs}}
            for name, shape in {**graph_inputs, **graph_outputs}.items():
                dims = shape[1:]
                if name in wanted and (len(dims) != len(wanted[name]) or any(
                        isinstance(g, int) and g != w for g, w in zip(dims, wanted[name]))):
                    raise ManifestError(f"{where}: {name} is {dims} per sample in the graph, the manifest says "
                                        f"{wanted[name]}")

    def _sessions(self, graphs: bool) -> list:
        device = self.device.with_cuda_graphs(graphs)
        stages = self.manifest.stages
        return [device.session(str(self.path / s.file), len(stages)) for s in stages]

    @property
    def num_stages(self) -> int:
        return len(self.sessions)

    @property
    def on_cuda(self) -> bool:
        """Whether the stages really run on CUDA (onnxruntime falls back to CPU when the CUDA libraries fail)."""
        return Device.runs_on_cuda(self.sessions[0])

    def _chunks(self, n: int) -> list[slice]:
        """A batch as the engine takes it: whole on the host engine, at most the largest bucket when bound."""
        return self.engine.buckets.chunks(n) if isinstance(self.engine, BoundEngine) else [slice(0, n)]

    def stage_logits(self, stage: int, images: np.ndarray) -> np.ndarray:
        """One stage's own logits for every image (float32 [N, classes]), through the engine (and through the
        earlier stages whose outputs it reads)."""
        return self.every_stage_logits(images, self._needed(stage))[stage]

    def every_stage_logits(self, images: np.ndarray, stages: set[int] | None = None) -> list[np.ndarray | None]:
        """Each stage's own logits (float32 [N, classes]) for every image, every image through every stage (or
        through `stages` only, which must hold the stages they read from; None for the others), through the
        engine."""
        images = self.check_images(images)
        needed = set(range(self.num_stages)) if stages is None else stages
        out: list[list[np.ndarray]] = [[] for _ in range(self.num_stages)]
        with self.engine.lock:
            for chunk in self._chunks(len(images)):
                rows = np.arange(chunk.stop - chunk.start)
                where = images_part(self.engine.stage_block(images[chunk]), rows)
                for s in sorted(needed):
                    run = self.engine.run(s, [where])
                    out[s].append(run.logits)
                    where.update({src: (block, rows) for src, block in run.carried.items()})
        return [np.concatenate(o) if len(o) > 1 else o[0] if o else None for o in out]

    def _needed(self, stage: int) -> set[int]:
        """Stage `stage` and the stages whose outputs it reads, directly or not."""
        index = {s.name: i for i, s in enumerate(self.manifest.stages)}
        needed, todo = set(), [stage]
        while todo:
            s = todo.pop()
            if s not in needed:
                needed.add(s)
                todo += [index[src.rpartition(".")[0]] for src in self.manifest.stages[s].sources if src != IMAGES]
        return needed

    def graph_outputs(self, images: np.ndarray, batch_size: int = 1000) -> list[dict[str, np.ndarray]]:
        """Every output of every stage's graph (logits and the declared outputs, float32) for every image, every
        image through every stage, run on the sessions directly (the export's parity check of each output)."""
        images = self.check_images(images)
        out: list[dict[str, list]] = [{} for _ in self.manifest.stages]
        for i in range(0, len(images), batch_size):
            values = {IMAGES: images[i:i + batch_size]}
            for s, stage in enumerate(self.manifest.stages):
                names = ["logits", *(o.name for o in stage.outputs)]
                got = self.sessions[s].run(names, {x.name: values[x.source] for x in stage.inputs})
                for name, value in zip(names, got):
                    out[s].setdefault(name, []).append(value)
                    if name != "logits":
                        values[f"{stage.name}.{name}"] = value
        return [{name: np.concatenate(v) for name, v in o.items()} for o in out]

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise CascadeInputError(f"images must be [N, {', '.join(map(str, self.input_shape))}], got "
                                    f"{list(images.shape)}")
        return np.ascontiguousarray(images, dtype=np.float32)

    def thresholds_for(self, threshold: float | None, base: Sequence[float] | None = None) -> np.ndarray:
        """One threshold for every non-final stage, checked; None: `base` (default the manifest's thresholds)."""
        if threshold is None:
            return np.asarray(self.manifest.exit.thresholds if base is None else base, dtype=np.float64)
        if not 0.0 <= threshold <= 1.0:
            raise CascadeInputError(f"threshold must be between 0 and 1, got {threshold}")
        return np.full(self.num_stages - 1, threshold, dtype=np.float64)

    def check_max_stage(self, max_stage: int | None, base: int | None = None) -> int:
        """The last stage a sample may reach, checked; None: `base` (default the final stage)."""
        if max_stage is None:
            return self.num_stages - 1 if base is None else base
        last = int(max_stage)
        if not 0 <= last < self.num_stages:
            raise CascadeInputError(f"max_stage must be between 0 and {self.num_stages - 1}, got {max_stage}")
        return last

    def samples(self, n: int, threshold: float | None | Sequence[float | None] = None,
                max_stage: int | None | Sequence[int | None] = None, point: str | None = None, *,
                serve_at: str | None = None) -> CascadeSamples:
        """n samples' exit settings, checked. point: the id of one of the manifest's operating points, whose
        thresholds and last stage replace the calibrated ones; then threshold replaces every threshold and max_stage
        the last stage; each given once or per sample (a sequence of n values, None keeping what the point or the
        manifest says). serve_at: the id of a (cheaper) operating point the samples run at instead of what was
        asked for, which stays their reference for exit reasons (the server degrading under load)."""
        thresholds, last_stage = self.point_settings(point) if point is not None else (None, None)
        rows = _each(threshold, n, lambda t: self.thresholds_for(t, thresholds), "thresholds")
        last = _each(max_stage, n, lambda m: self.check_max_stage(m, last_stage), "max_stage values")
        table = np.asarray(rows, dtype=np.float64).reshape(n, self.num_stages - 1)
        last = np.asarray(last, dtype=np.int32).reshape(n)
        if serve_at is None:
            return CascadeSamples(table, last, self.num_classes)
        at_thresholds, at_last = self.point_settings(serve_at)
        return CascadeSamples(np.tile(np.asarray(at_thresholds, np.float64), (n, 1)).reshape(n, self.num_stages - 1),
                              np.full(n, at_last, np.int32), self.num_classes, reference=(table, last))

    def point_settings(self, point: str) -> tuple[list[float], int]:
        """(thresholds, last stage) of one of the manifest's operating points. "default" always exists: the
        calibrated thresholds with every stage, also in a version calibrated before curves were stored."""
        points = self.manifest.operating_points
        if points is None and point == "default":
            return self.manifest.exit.thresholds, self.num_stages - 1
        ids = [p.id for p in points.points] if points else ["default"]
        if point not in ids:
            shown = point if len(point) <= 64 else point[:64] + "..."
            older = "" if points else " (it was calibrated before curves were stored: `reskd calibrate` adds them)"
            raise CascadeInputError(f"{self.manifest.name}:{self.manifest.version} has no operating point "
                                    f"{shown!r}; its points are {', '.join(ids)}{older}")
        chosen = points.point(point)
        return chosen.thresholds, chosen.max_stage

    def run(self, images: np.ndarray, *, threshold: float | None | Sequence[float | None] = None,
            max_stage: int | None | Sequence[int | None] = None, point: str | None = None, early_exit: bool = True,
            on_stage: StageHook | None = None) -> CascadeResult:
        """Classify a batch (settings as in `samples`). early_exit=False runs every stage (up to max_stage) on
        every sample. on_stage(stage, samples, seconds) is called after each stage that ran (for metrics)."""
        images = self.check_images(images)
        n = len(images)
        samples = self.samples(n, threshold, max_stage, point)
        stages = int(samples.last.max(initial=0)) + 1
        for chunk in self._chunks(n):
            with self.engine.lock:  # a bound engine's staging buffer holds this chunk until its last stage
                active = np.arange(chunk.stop - chunk.start)  # the chunk's undecided samples
                where: Part = images_part(self.engine.stage_block(images[chunk]), active)
                for s in range(stages):
                    if len(active) == 0:
                        break
                    start = time.perf_counter()
                    run = self.engine.run(s, [where])
                    if on_stage is not None:
                        on_stage(s, len(active), time.perf_counter() - start)
                    (leave,) = advance(self.rule, s, [(samples, chunk.start + active)], run.logits, early_exit)
                    where = self.survivors(s, where, run.carried, ~leave)
                    active = active[~leave]
        return samples.result(self.cum_flops)

    def survivors(self, stage: int, where: Part, carried: dict, keep: np.ndarray) -> Part:
        """Where the samples that go on after `stage` find what later stages read: their rows of every source
        still read (and of the stage's carried outputs, whose rows are the batch's order); nothing else."""
        later = self.plan.read_after(stage)
        kept = {src: (block, rows[keep]) for src, (block, rows) in where.items() if src in later}
        batch = np.flatnonzero(keep)
        kept.update({src: (block, batch) for src, block in carried.items() if src in later})
        return kept

    def all_stage_logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Running logits after every stage for every sample: [stages, N, classes] (for calibration)."""
        images = self.check_images(images)
        out = np.zeros((self.num_stages, len(images), self.num_classes), dtype=np.float64)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            total = np.zeros((len(chunk), self.num_classes), dtype=np.float64)
            for s, logits in enumerate(self.every_stage_logits(chunk)):
                total = combine(total, logits, self.rule.combine[s])
                out[s, i:i + batch_size] = total
        return out


def _each(value, n: int, check, what: str) -> list:
    """A setting given once (None or a scalar) or per sample (a sequence of N), checked, as N values."""
    if value is None or np.isscalar(value):
        return [check(value)] * n
    if len(value) != n:
        raise CascadeInputError(f"{len(value)} {what} for {n} images")
    return [check(v) for v in value]
