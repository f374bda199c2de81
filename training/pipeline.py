"""`reskd train`: teacher -> student (KD) -> res-students (residual) -> baselines -> evaluation -> report.

Every stage is checkpointed in the run directory (training.rundir) as soon as it finishes, and after each of its
epochs while it trains (a partial checkpoint); with --resume a finished stage is loaded instead of trained and an
interrupted one continues from its last finished epoch, after checking that the recipe still trains it the same
way (its fingerprint). Earlier stages are frozen in eval mode while later ones train, so their weights and
batch-norm statistics never move.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import loop
from .batches import Augmentation, Normalizer, batches
from .data import DataBundle, DatasetError, load_dataset
from .distributed import SINGLE, World, sync_batchnorm
from .flops import count_flops, count_params
from .losses import cross_entropy, kd_loss, reach_weights, residual_mse, residual_target
from .models import ModelSpec, build_model
from .recipe import Recipe, RecipeError, ResStudentConfig
from .report import analyse, plot_pareto, render_markdown
from .rundir import Checkpoint, PartialCheckpoint, RunDir, RunDirError, read_weights


@dataclass
class Attempt:
    """A stage being trained by this process: the fingerprint it trains under, when its training began (earlier,
    interrupted attempts' seconds included) and, with --resume, where the last of those attempts left it."""

    fingerprint: str
    started: float
    resumed: PartialCheckpoint | None = None


@dataclass
class Stage:
    """A trained (or loaded) model with what the report needs to know about it."""

    name: str
    kind: str  # teacher | student | res_student | kd_baseline
    spec: ModelSpec
    model: torch.nn.Module
    seed: int
    reads: Stage | None = None  # the stage whose last feature map this one reads; None: the image
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    trained_now: bool = False
    attempt: Attempt | None = None  # set when it is trained rather than loaded

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """This stage's output for images x (through the stage it reads, which is frozen)."""
        if self.reads is None:
            return self.model(x)
        with torch.no_grad():
            features = self.reads.model.features(x)
        return self.model(features)

    def on_images(self) -> torch.nn.Module:
        """A module from images to this stage's logits (evaluation)."""
        return self.model if self.reads is None else OnFeatures(self.reads.model, self.model)

    def input_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        """What this stage's own layers read (FLOPs count only them)."""
        return image_shape if self.reads is None else feature_shape(self.reads.model, image_shape)


@torch.no_grad()
def feature_shape(backbone: torch.nn.Module, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
    device = next(backbone.parameters()).device
    return tuple(backbone.features(torch.zeros(1, *image_shape, device=device)).shape[1:])


class OnFeatures(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features(x))


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# Settings added after run directories existed enter a fingerprint only when they are set to something else than
# their default (the value that reproduces the earlier training), so earlier runs stay resumable.
LATER_SETTINGS = {"random_erasing": (None, 0.0), "autocast": (None, "auto"), "channels_last": (None,),
                  "sync_batchnorm": (None, False)}


def settled(cfg) -> dict:
    """A recipe section as it enters a fingerprint."""
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if not (k in LATER_SETTINGS and v in LATER_SETTINGS[k])}


def _seed(recipe: Recipe, name: str, offset: int = 0) -> int:
    return recipe.seed * 100_003 + zlib.crc32(name.encode()) % 100_000 + offset * 7_919


class Trainer:
    def __init__(self, recipe: Recipe, out: Path, *, resume: bool = False, device: str | torch.device = "auto",
                 on_checkpoint: Callable[[], None] | None = None, predictions: dict | None = None,
                 world: World = SINGLE):
        """on_checkpoint: called after every partial checkpoint is written (each epoch of each stage), e.g. to
        copy the run somewhere that outlives the machine. predictions: logits already computed in this process,
        by stage fingerprint and evaluation split (a sweep passes one dict to all its variants, which share the
        teacher, the student and the baselines); this trainer adds its own. world: this process's rank of a
        distributed run (training/distributed.py; its process group started, device: this rank's)."""
        self.recipe = recipe
        self.run_dir = RunDir(out)
        self.resume = resume
        self.on_checkpoint = on_checkpoint
        self.predictions = {} if predictions is None else predictions
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.world = world
        world.same(hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest(),
                   "the recipe (file and --set overrides)")
        self._agree(self._check_batches)
        self._agree(self._check_run_dir, main_only=True)

    def _agree(self, check: Callable[[], object], main_only: bool = False):
        """check() (on rank 0 alone when main_only) -> what it returns. In a distributed run an error it raises on
        any rank stops every rank with that rank's message (DistributedError); in one process it is raised as is."""
        if not self.world.distributed:
            return check()
        problem, result = None, None
        if self.world.main or not main_only:
            try:
                result = check()
            except (RunDirError, DatasetError, RecipeError, FileNotFoundError, ValueError) as err:
                problem = str(err)
        self.world.agree(problem)
        return result

    def _check_batches(self) -> None:
        """Every stage's batch_size (the global batch) splits evenly over the ranks."""
        r = self.recipe
        sections = {"teacher": r.teacher, "student": r.student, "baselines": r.baselines,
                    **{f"res_students[{k}]": c for k, c in enumerate(r.res_students)}}
        problems = [self.world.check_batch(c.resolve(r.train).batch_size, name) for name, c in sections.items()]
        problems = [p for p in problems if p]
        if problems:
            raise RecipeError("; ".join(problems))

    # -- run directory ------------------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        out = self.run_dir.path
        if (self.run_dir.checkpoint_names() or self.run_dir.partial_names()) and not self.resume:
            raise RunDirError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        if self.resume and self.run_dir.run_file.is_file():
            previous = self.run_dir.read_run_info()["recipe"]
            if previous.get("data") != self.recipe.model_dump(mode="json")["data"]:
                raise RunDirError(f"{out} was trained on other data settings; resume it with the same recipe")

    def environment(self) -> dict:
        return {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "world_size": self.world.size,
        }

    def _write_run_file(self, data: DataBundle) -> None:
        info = {
            "recipe": self.recipe.model_dump(mode="json"),
            "data": {
                "dataset": data.name, "labels": data.labels, "channels": data.channels, "height": data.height,
                "width": data.width, "mean": data.mean, "std": data.std, **data.meta,
                "val_ids": data.val.ids.tolist(),
            },
            "environment": self.environment(),
        }
        self.run_dir.write_run_info(info)

    # -- stages -------------------------------------------------------------------------------------------------
    def _build(self, spec: ModelSpec, seed: int, in_channels: int, data: DataBundle) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_model(spec, in_channels, len(data.labels))
        if self.world.distributed and self.recipe.train.sync_batchnorm:
            model = sync_batchnorm(model, self.device)
        return loop.prepare(model, self.device, loop.uses_channels_last(self.device, self.recipe.train))

    def _load_checkpoint(self, name: str, fingerprint: str, model: torch.nn.Module) -> Checkpoint | None:
        """The stage's finished checkpoint loaded into `model`, or None. Rank 0 reads it and sends it to the
        other ranks."""
        ckpt = self._agree(lambda: self._read_checkpoint(name, fingerprint), main_only=True)
        ckpt = self.world.broadcast(ckpt)
        if ckpt is None:
            return None
        model.load_state_dict(ckpt.state_dict)
        model.eval()
        return ckpt

    def _read_checkpoint(self, name: str, fingerprint: str) -> Checkpoint | None:
        if not self.run_dir.has_checkpoint(name):
            return None
        ckpt = self.run_dir.load_checkpoint(name, map_location="cpu" if self.world.distributed else self.device)
        if ckpt.fingerprint != fingerprint:
            raise RunDirError(f"{self.run_dir.checkpoint_path(name)} was trained with other settings than the recipe "
                              f"now gives for stage {name!r}; delete that checkpoint (and later ones) to retrain it, "
                              "or use another --out")
        return ckpt

    def _load_partial(self, name: str, fingerprint: str) -> PartialCheckpoint | None:
        """The stage's partial checkpoint (--resume), read by rank 0 and sent to the other ranks, or None."""
        return self.world.broadcast(self._agree(lambda: self._read_partial(name, fingerprint), main_only=True))

    def _read_partial(self, name: str, fingerprint: str) -> PartialCheckpoint | None:
        if not self.run_dir.has_partial(name):
            return None
        partial = self.run_dir.load_partial(name)
        if partial.fingerprint != fingerprint:
            raise RunDirError(f"{self.run_dir.partial_path(name)} was trained with other settings than the recipe "
                              f"now gives for stage {name!r}; delete that partial checkpoint to train the stage "
                              "from its first epoch, or use another --out")
        return partial

    def _save_checkpoint(self, stage: Stage, fingerprint: str, in_channels: int, data: DataBundle) -> None:
        if not self.world.main:
            return
        self.run_dir.save_checkpoint(Checkpoint(
            stage.name, stage.kind, stage.spec.arch, stage.spec.width, in_channels, len(data.labels),
            stage.model.state_dict(), fingerprint, stage.history, stage.extra))

    def _stage(self, name: str, kind: str, spec: ModelSpec, fingerprint: str, data: DataBundle, train_fn, *,
               seed_offset: int = 0, reads: Stage | None = None) -> Stage:
        seed = _seed(self.recipe, name, seed_offset)
        in_channels = data.channels
        if reads is not None:
            in_channels = feature_shape(reads.model, (data.channels, data.height, data.width))[0]
        model = self._build(spec, seed, in_channels, data)
        ckpt = self._load_checkpoint(name, fingerprint, model)
        if ckpt is not None:
            if self.world.main:
                print(f"[resume] {name}: loaded {self.run_dir.checkpoint_path(name)}", file=sys.stderr)
            stage = Stage(name, kind, spec, model, seed, reads, ckpt.history, ckpt.extra)
        else:
            stage = Stage(name, kind, spec, model, seed, reads, trained_now=True)
            partial = self._load_partial(name, fingerprint)
            if partial is not None:
                stage.extra = partial.extra  # what the interrupted attempt computed before its first epoch
            elif reads is not None:
                stage.extra["reads"] = f"{reads.name}.features"  # export declares it as the stage's input
            stage.attempt = Attempt(fingerprint, time.time() - (partial.seconds if partial else 0.0), partial)
            train_fn(stage)
            stage.extra["train_seconds"] = round(time.time() - stage.attempt.started, 1)
            self._save_checkpoint(stage, fingerprint, in_channels, data)
        stage.model.eval()
        stage.model.requires_grad_(False)  # frozen from here on: later stages only read it
        return stage

    def _fit(self, stage: Stage, step, cfg, data: DataBundle, normalizer: Normalizer) -> None:
        """loop.fit, continuing from the stage's partial checkpoint (--resume) and rewriting it after every epoch."""
        attempt = stage.attempt
        resume = attempt.resumed.progress if attempt.resumed else None
        if resume is not None and self.world.main:
            where = f"epoch {resume.epoch + 1}/{cfg.epochs}" if resume.epoch < cfg.epochs else \
                f"all {cfg.epochs} epochs trained"
            print(f"[resume] {stage.name}: {where} from {self.run_dir.partial_path(stage.name)}", file=sys.stderr)

        def save(progress: loop.Progress) -> None:  # rank 0 alone (loop.fit)
            self.run_dir.save_partial(PartialCheckpoint(stage.name, attempt.fingerprint, progress, stage.extra,
                                                        round(time.time() - attempt.started, 1)))
            if self.on_checkpoint is not None:
                self.on_checkpoint()

        # The steps call stage.model: under DistributedDataParallel while the stage trains, itself after.
        model = stage.model
        stage.model = self.world.wrap(model, self.device)
        try:
            stage.history = loop.fit(model, step, data.train, cfg, normalizer=normalizer, device=self.device,
                                     seed=stage.seed, desc=stage.name, resume=resume, on_epoch=save,
                                     world=self.world)
        finally:
            stage.model = model

    def teacher(self, data: DataBundle, normalizer: Normalizer) -> Stage:
        r = self.recipe
        cfg = r.teacher.resolve(r.train)

        def train(stage: Stage) -> None:
            if r.teacher.checkpoint:
                load_external_checkpoint(stage.model, r.teacher.checkpoint)
                stage.extra["source"] = str(r.teacher.checkpoint)
                return

            def step(x, y):
                logits = stage.model(x).float()
                return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits

            self._fit(stage, step, cfg, data, normalizer)

        return self._stage("teacher", "teacher", r.teacher.spec, self.fingerprints()["teacher"], data, train)

    def kd_model(self, name: str, kind: str, spec: ModelSpec, cfg, alpha: float, temperature: float,
                 fingerprint: str, teacher: Stage, data: DataBundle, normalizer: Normalizer) -> Stage:
        def train(stage: Stage) -> None:
            def step(x, y):
                with torch.no_grad():
                    t = teacher.model(x).float()
                s = stage.model(x).float()
                return kd_loss(s, t, y, alpha, temperature), s

            self._fit(stage, step, cfg, data, normalizer)

        return self._stage(name, kind, spec, fingerprint, data, train)

    def res_student(self, k: int, rcfg: ResStudentConfig, teacher: Stage, frozen: list[Stage], data: DataBundle,
                    normalizer: Normalizer) -> Stage:
        cfg = rcfg.resolve(self.recipe.train)

        def cascade_so_far(x):
            return sum(s.logits(x).float() for s in frozen)

        def train(stage: Stage) -> None:
            if stage.attempt.resumed is None:  # a resumed stage has its weights and scale from its first attempt
                # A zero output layer makes the new stage start as a no-op: the cascade is exactly as good as
                # before and the residual is learned from there, instead of first undoing random logits.
                torch.nn.init.zeros_(stage.model.fc.weight)
                torch.nn.init.zeros_(stage.model.fc.bias)
                # Measured by rank 0 and sent to the others, so every rank trains with the same scale.
                stage.extra["residual_scale_sq"] = self.world.broadcast(
                    self._residual_scale(rcfg, teacher, cascade_so_far, cfg, data, normalizer, stage.seed)
                    if self.world.main else None)
            scale_sq = stage.extra["residual_scale_sq"]

            def step(x, y):
                with torch.no_grad():
                    t = teacher.model(x).float()
                    prev = cascade_so_far(x)
                    w = reach_weights(prev) if rcfg.sample_weighting == "reach" else None
                r = stage.logits(x).float()
                z = prev + r
                loss = torch.zeros((), device=x.device)
                if rcfg.mse_weight:
                    loss = loss + rcfg.mse_weight * residual_mse(r, residual_target(t, prev), scale_sq, w)
                if rcfg.ce_weight:
                    loss = loss + rcfg.ce_weight * cross_entropy(z, y, w)
                if rcfg.kd_weight:
                    loss = loss + rcfg.kd_weight * kd_loss(z, t, y, 0.0, rcfg.kd_temperature, w)
                return loss, z

            self._fit(stage, step, cfg, data, normalizer)

        name = f"res{k + 1}"
        reads = frozen[0] if rcfg.input == "features" else None  # the student
        return self._stage(name, "res_student", rcfg.spec, self.fingerprints()[name], data, train,
                           seed_offset=rcfg.seed, reads=reads)

    @torch.no_grad()
    def _residual_scale(self, rcfg, teacher, cascade_so_far, cfg, data, normalizer, seed: int) -> float:
        """rho^2: the mean squared norm of the centred residual over (up to) 20 augmented training batches, or the
        class count for residual_norm = "none" (plain per-element MSE)."""
        if rcfg.residual_norm == "none":
            return float(len(data.labels))  # plain per-element mean squared error
        total, count = 0.0, 0
        for i, (x, _) in enumerate(batches(data.train, cfg.batch_size, normalizer=normalizer, device=self.device,
                                           shuffle=True, seed=seed,
                                           augmentation=Augmentation.of(cfg))):
            if i == 20:
                break
            with loop.autocast(self.device, loop.uses_bf16(self.device, cfg)):
                target = residual_target(teacher.model(x).float(), cascade_so_far(x))
            total += float((target ** 2).sum())
            count += len(x)
        return max(total / count, 1e-8)

    # -- the whole run ------------------------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, str]:
        """Checkpoint name -> a hash of everything that determines that stage's weights: data, seed, its own
        section with the training settings it resolves to, and the fingerprints of the stages it learns from."""
        r = self.recipe

        def digest(*parts) -> str:
            payload = json.dumps([r.seed, r.data.model_dump(mode="json"), *parts], sort_keys=True, default=str)
            return hashlib.sha256(payload.encode()).hexdigest()[:16]

        def section(cfg) -> dict:
            return {"section": settled(cfg), "train": settled(cfg.resolve(r.train))}

        fps = {"teacher": digest("teacher", section(r.teacher))}
        fps["student"] = previous = digest(fps["teacher"], "student", section(r.student))
        for k, rcfg in enumerate(r.res_students):
            fps[f"res{k + 1}"] = previous = digest(fps["teacher"], previous, "res_student", section(rcfg))
        b = r.baselines
        for entry in self._grid_entries():
            fps[f"kd-{entry.spec.tag}"] = digest(fps["teacher"], "kd_baseline", entry.spec.tag, b.kd_alpha,
                                                 b.kd_temperature, settled(b.resolve(r.train)))
        return fps

    def _grid_entries(self):
        # The student is itself a KD single model of its size; the report lists it in the grid instead.
        return [e for e in self.recipe.baselines.kd_grid if e.spec != self.recipe.student.spec]

    def run(self, until: Literal["teacher", "cascade", "all"] = "all") -> dict | None:
        """Train what is not trained yet, up to `until` (the teacher; the student and res-students too; the
        baselines too), then evaluate and report what there is (rank 0; the other ranks return None)."""
        r = self.recipe
        started = time.time()
        fps = self.fingerprints()
        data = self._agree(lambda: load_dataset(r.data))  # every rank reads the data itself
        data = data.to(self.device)
        if self.world.main:
            self._write_run_file(data)
        normalizer = Normalizer(data.mean, data.std, self.device)

        stages = [self.teacher(data, normalizer)]
        if until != "teacher":
            stages.append(self.kd_model("student", "student", r.student.spec, r.student.resolve(r.train),
                                        r.student.kd_alpha, r.student.kd_temperature, fps["student"], stages[0], data,
                                        normalizer))
            for k, rcfg in enumerate(r.res_students):
                stages.append(self.res_student(k, rcfg, stages[0], list(stages[1:]), data, normalizer))
        if until == "all":
            bcfg = r.baselines.resolve(r.train)
            stages += [self.kd_model(f"kd-{e.spec.tag}", "kd_baseline", e.spec, bcfg, r.baselines.kd_alpha,
                                     r.baselines.kd_temperature, fps[f"kd-{e.spec.tag}"], stages[0], data, normalizer)
                       for e in self._grid_entries()]
        if not self.world.main:  # evaluation and the report are rank 0's
            return None
        logits = self.evaluate(stages, data, normalizer, fps)
        shape = (data.channels, data.height, data.width)
        flops = {s.name: count_flops(s.model, s.input_shape(shape)) for s in stages}  # a stage's own layers
        report = analyse(r, data, stages, logits, flops, {s.name: count_params(s.model) for s in stages},
                         self.environment())
        report["wall_seconds"] = round(time.time() - started, 1)
        self.run_dir.write_report(report, render_markdown(report))
        if "cascade" in report:
            plot_pareto(report, self.run_dir.path / "pareto.png")
        return report

    def evaluate(self, stages: list[Stage], data: DataBundle, normalizer: Normalizer,
                 fps: dict[str, str]) -> dict[str, np.ndarray]:
        """Logits of every model on validation and test, saved to RUN_DIR/logits.npz for export and re-analysis.
        A stage evaluated before in this process (self.predictions) is not run again: its fingerprint (fps) covers
        the recipe's data settings, so the same fingerprint, split, batch size and device give the same logits."""
        bs = self.recipe.train.eval_batch_size
        arrays = {"val/labels": data.val.labels.cpu().numpy(), "test/labels": data.test.labels.cpu().numpy()}
        for stage in stages:
            for split_name, split in (("val", data.val), ("test", data.test)):
                key = (fps[stage.name], split_name, bs, str(self.device))
                if key not in self.predictions:
                    self.predictions[key] = loop.predict(stage.on_images(), split, normalizer=normalizer,
                                                         device=self.device, batch_size=bs).numpy()
                arrays[f"{split_name}/{stage.name}"] = self.predictions[key]
        self.run_dir.write_logits(arrays)
        return arrays


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_external_checkpoint(model: torch.nn.Module, path: str) -> None:
    """A teacher from elsewhere: one of our stage checkpoints, or a bare state_dict of the same architecture."""
    state = read_weights(path, "teacher.checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"teacher.checkpoint {path} does not fit the recipe's teacher arch: {err}") from None


def train(recipe: Recipe, out: str | Path, *, resume: bool = False, device: str | torch.device = "auto",
          world: World = SINGLE) -> dict | None:
    return Trainer(recipe, Path(out), resume=resume, device=device, world=world).run()
