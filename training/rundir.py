"""The run directory `reskd train` writes and `reskd export` reads: this module alone knows its layout and the
checkpoint format.

    RUN_DIR/run.json              the recipe, the data's facts (labels, shape, normalisation, validation ids)
                                  and the machine
    RUN_DIR/checkpoints/NAME.pt   one trained network each (teacher, student, res1.., kd-TAG): Checkpoint below
    RUN_DIR/checkpoints/partial/NAME.pt
                                  a stage still in training, rewritten after each of its epochs and removed when
                                  its NAME.pt is written: PartialCheckpoint below
    RUN_DIR/logits.npz            validation and test logits of every network ("val/NAME", "test/labels", ...)
    RUN_DIR/report.json, report.md, pareto.png

Checkpoints and run.json are written atomically (reskd.files): a killed run leaves whole files or none.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from reskd.files import replacing, write_atomic

from .loop import Progress
from .models import ModelSpec, build_model

CHECKPOINT_DIR = "checkpoints"
PARTIAL_DIR = "partial"  # in CHECKPOINT_DIR
RUN_FILE = "run.json"
LOGITS_FILE = "logits.npz"
REPORT_FILES = ("report.json", "report.md", "pareto.png")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


@dataclass
class Checkpoint:
    """One trained network: enough to rebuild it (arch, width, channels, classes, weights) and to know whether the
    recipe still trains it the same way (fingerprint)."""

    name: str
    kind: str  # teacher | student | res_student | kd_baseline
    arch: str
    width: float
    in_channels: int
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    extra: dict = field(default_factory=dict)  # train_seconds, residual_scale_sq, source, ...

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.arch, self.width)

    def build(self) -> torch.nn.Module:
        """The network with these weights, in eval mode, on the CPU."""
        model = build_model(self.spec, self.in_channels, self.num_classes)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class PartialCheckpoint:
    """A stage whose training was interrupted, as it stood after its last finished epoch: the training state
    (weights, optimizer, schedule, RNG, history), the stage's extra so far (what it computed before its first epoch,
    e.g. residual_scale_sq), the seconds spent on it until then, and the fingerprint it trains under."""

    name: str
    fingerprint: str
    progress: Progress
    extra: dict
    seconds: float


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINT_DIR
        self.partials = self.checkpoints / PARTIAL_DIR
        self.run_file = self.path / RUN_FILE
        self.logits_file = self.path / LOGITS_FILE
        self.report_file = self.path / REPORT_FILES[0]

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pt"

    def checkpoint_names(self) -> list[str]:
        return sorted(p.stem for p in self.checkpoints.glob("*.pt"))

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Also removes the stage's partial checkpoint, which the finished one supersedes, and the partial folder
        once it is empty: a finished run's checkpoints/ holds its checkpoints alone."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()}
        with replacing(self.checkpoint_path(ckpt.name)) as tmp:
            torch.save({**asdict(ckpt), "state_dict": state}, tmp)
        self.partial_path(ckpt.name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # absent, or still holding another stage's partial checkpoint
            self.partials.rmdir()

    def load_checkpoint(self, name: str, map_location: str | torch.device = "cpu") -> Checkpoint:
        path = self.checkpoint_path(name)
        if not path.is_file():
            raise RunDirError(f"{path} is missing: is the run finished? (reskd train --resume completes it)")
        return Checkpoint(**torch.load(path, map_location=map_location, weights_only=True))

    # -- partial checkpoints: stages interrupted mid-training ---------------------------------------------------
    def partial_path(self, name: str) -> Path:
        return self.partials / f"{name}.pt"

    def partial_names(self) -> list[str]:
        return sorted(p.stem for p in self.partials.glob("*.pt"))

    def has_partial(self, name: str) -> bool:
        return self.partial_path(name).is_file()

    def save_partial(self, partial: PartialCheckpoint) -> None:
        self.partials.mkdir(parents=True, exist_ok=True)
        with replacing(self.partial_path(partial.name)) as tmp:
            torch.save(asdict(partial), tmp)

    def load_partial(self, name: str) -> PartialCheckpoint:
        """On the CPU, where the RNG states must be; loading the weights and optimizer state into the model moves
        them to its device."""
        saved = torch.load(self.partial_path(name), map_location="cpu", weights_only=True)
        return PartialCheckpoint(**{**saved, "progress": Progress(**saved["progress"])})

    # -- run.json -----------------------------------------------------------------------------------------------
    def write_run_info(self, info: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_file, json.dumps(info, indent=1))

    def read_run_info(self) -> dict:
        """{"recipe": the recipe as trained, "data": {labels, channels, height, width, mean, std, val_ids, ...},
        "environment": ...}."""
        if not self.run_file.is_file():
            raise RunDirError(f"{self.run_file} is missing: RUN_DIR must be a directory written by `reskd train`")
        return json.loads(self.run_file.read_text())

    # -- evaluation ---------------------------------------------------------------------------------------------
    def write_logits(self, arrays: dict[str, np.ndarray]) -> None:
        with replacing(self.logits_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

    def write_report(self, report: dict, markdown: str) -> None:
        """report.json and report.md (training.report renders them; pareto.png is plotted beside them)."""
        write_atomic(self.report_file, json.dumps(report, indent=1))
        write_atomic(self.path / REPORT_FILES[1], markdown)

    def current_report(self, recipe: dict, fingerprints: dict[str, str]) -> dict | None:
        """report.json, if it still describes what this recipe would train and report: run.json holds the same
        recipe, every stage has its checkpoint with the same fingerprint, and the report was written after all of
        them. None otherwise (the run must train or evaluate again)."""
        try:
            if json.loads(self.run_file.read_text()).get("recipe") != recipe:
                return None
            written = self.report_file.stat().st_mtime
            if written < self.run_file.stat().st_mtime:
                return None
            for name, fingerprint in fingerprints.items():
                path = self.checkpoint_path(name)
                if path.stat().st_mtime > written or self.load_checkpoint(name).fingerprint != fingerprint:
                    return None
            return json.loads(self.report_file.read_text())
        except (OSError, ValueError, RunDirError):
            return None


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The weights in a file from elsewhere (`what` names the setting that pointed at it): one of our checkpoints,
    or a bare state_dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if state is None:
        raise ValueError(f"{what} {path} holds neither a state_dict nor a reskd checkpoint")
    return state
