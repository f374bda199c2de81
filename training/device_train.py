"""`reskd device-train`: the reference cascade on a GPU host, in named steps, in priority order.

A device session is short (minutes) and may be cut off, so the work is split into steps that each leave their
result on disk the moment they finish, and a re-run resumes from them (finished stages load from their
checkpoints; see training.pipeline):

1. teacher    the candidates of the plan, smallest first, each in OUT/teacher-LABEL; the first whose validation
              accuracy reaches the plan's target is the teacher (none does: the most accurate one, and the
              progress file says the target was missed);
2. cascade    OUT/main: the student and the res-students of the recipe, distilled from that teacher;
3. baselines  OUT/main again: the KD single models and the independent-models cascade of the recipe.

OUT/progress.json records each finished step (seconds, accuracies, the chosen teacher). With --pack DIR, OUT is
written after every step as DIR/run.tar.partNNN (tar, split into parts of at most 15 MiB, so a device call that
brings back a few files of 16 MiB each returns everything); `cat DIR/run.tar.part* | tar -x -C DEST` restores it.
Inside a step it is packed again after an epoch's partial checkpoint once --pack-every seconds have passed since
the last pack, so a call cut off mid-step (an H200 trained the first teacher candidate at 7.7 s per epoch, 60
epochs) still brings its epochs back, and the next machine resumes from them (bench/device_train.sh).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from reskd.files import write_atomic

from .pipeline import Trainer
from .recipe import RecipeError, load_recipe

STEPS = ("teacher", "cascade", "baselines")
PLAN_DIR = Path(__file__).parent / "plans"
PART_BYTES = 15 * 1024 * 1024
PROGRESS = "progress.json"


@dataclass
class Plan:
    recipe: str  # path of the recipe the steps train
    target_val_accuracy: float  # % on validation, for the teacher
    teacher_candidates: list[dict]  # recipe overrides, smallest teacher first; each has a `label`
    tiny: dict  # overrides for a CPU rehearsal on a few hundred images

    @classmethod
    def load(cls, name_or_path: str | Path) -> Plan:
        """A plan file, or the name of a bundled one (training/plans/NAME.toml)."""
        path = Path(name_or_path)
        if not path.is_file() and (PLAN_DIR / f"{name_or_path}.toml").is_file():
            path = PLAN_DIR / f"{name_or_path}.toml"
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise RecipeError(f"cannot read plan {path}: {err}") from None
        missing = {"recipe", "target_val_accuracy", "teacher_candidates"} - set(raw)
        if missing:
            raise RecipeError(f"{path}: the plan needs {', '.join(sorted(missing))}")
        if not raw["teacher_candidates"] or any("label" not in c for c in raw["teacher_candidates"]):
            raise RecipeError(f"{path}: teacher_candidates needs at least one candidate, each with a `label`")
        recipe = Path(raw["recipe"])
        if not recipe.is_absolute():
            recipe = path.parent / recipe
        return cls(str(recipe), float(raw["target_val_accuracy"]), raw["teacher_candidates"], raw.get("tiny", {}))


def device_train(plan: Plan, out: str | Path, *, tiny: bool = False, device: str = "auto",
                 data_root: str | None = None, pack: str | Path | None = None, pack_every_s: float = 60.0,
                 steps: tuple[str, ...] = STEPS, log=print) -> dict:
    """Run `steps` of the plan into OUT (resuming what is there); returns the progress record. pack: pack OUT there
    after every step, and after an epoch once pack_every_s have passed since the last pack."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    last_pack = time.monotonic()

    def pack_now() -> None:
        nonlocal last_pack
        if pack is not None:
            pack_dir(out, Path(pack))
            last_pack = time.monotonic()

    def after_epoch() -> None:
        if pack is not None and time.monotonic() - last_pack >= pack_every_s:
            pack_now()
            log(f"[device-train] packed {out} into {pack} (mid-step)")
    common = {**({"data.root": data_root} if data_root else {}), **(plan.tiny if tiny else {})}

    def recipe(*overrides: dict):
        merged = {}
        for o in overrides:
            merged.update({k: v for k, v in o.items() if k != "label"})
        return load_recipe(plan.recipe, {**merged, **common})

    # Every recipe is validated before the first step trains: a typo should not cost device time.
    for candidate in plan.teacher_candidates:
        recipe(candidate)
    progress = _read_progress(out)
    predictions: dict = {}  # logits of stages already evaluated by an earlier step (Trainer.evaluate)
    for step in STEPS:
        if step not in steps:
            continue
        started = time.time()
        log(f"[device-train] step {step}")
        if step == "teacher":
            progress["teacher"] = _teachers(plan, out, recipe, device, after_epoch, predictions)
        else:
            chosen = progress.get("teacher")
            if chosen is None:
                raise RecipeError(f"step {step} needs the teacher step first (run it, or --steps teacher,{step})")
            candidate = next(c for c in plan.teacher_candidates if c["label"] == chosen["chosen"])
            checkpoint = str((out / f"teacher-{candidate['label']}" / "checkpoints" / "teacher.pt").resolve())
            report = Trainer(recipe(candidate, {"teacher.checkpoint": checkpoint}), out / "main", resume=True,
                             device=device, on_checkpoint=after_epoch, predictions=predictions).run(
                until="cascade" if step == "cascade" else "all")
            progress[step] = _summary(report)
        progress[step]["seconds"] = round(time.time() - started, 1)
        write_atomic(out / PROGRESS, json.dumps(progress, indent=1))
        pack_now()
        log(f"[device-train] {step} done in {progress[step]['seconds']} s")
    return progress


def _teachers(plan: Plan, out: Path, recipe, device: str, after_epoch, predictions: dict) -> dict:
    tried = []
    for candidate in plan.teacher_candidates:
        report = Trainer(recipe(candidate), out / f"teacher-{candidate['label']}", resume=True,
                         device=device, on_checkpoint=after_epoch, predictions=predictions).run(until="teacher")
        t = report["models"]["teacher"]
        tried.append({"label": candidate["label"], "tag": t["tag"], "params": t["params"], "flops": t["flops"],
                      "val_accuracy": t["val_accuracy"], "test_accuracy": t["test_accuracy"]})
        if t["val_accuracy"] >= plan.target_val_accuracy:
            break
    reached = [c for c in tried if c["val_accuracy"] >= plan.target_val_accuracy]
    chosen = reached[0] if reached else max(tried, key=lambda c: c["val_accuracy"])
    return {"chosen": chosen["label"], "target_val_accuracy": plan.target_val_accuracy,
            "target_reached": bool(reached), "tried": tried}


def _summary(report: dict) -> dict:
    m = report["models"]
    out = {"teacher_test_accuracy": m["teacher"]["test_accuracy"],
           "student_test_accuracy": m["student"]["test_accuracy"],
           "full_cascade_test_accuracy": report["cascade"]["depths"][-1]["test_accuracy"],
           "adaptive_test": report["adaptive"]["test"]}
    if report.get("kd_grid"):
        out["kd_grid"] = [{k: g[k] for k in ("tag", "pct_teacher_flops", "test_accuracy")} for g in report["kd_grid"]]
    return out


def _read_progress(out: Path) -> dict:
    path = out / PROGRESS
    return json.loads(path.read_text()) if path.is_file() else {}


def pack_dir(src: Path, dest: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """SRC as a tar split into DEST/run.tar.partNNN of at most part_bytes each (earlier parts replaced)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("run.tar.part*"):
        old.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(src, arcname=".")
    data = buffer.getvalue()
    parts = []
    for i in range(0, len(data), part_bytes):
        part = dest / f"run.tar.part{i // part_bytes:03d}"
        write_atomic(part, data[i:i + part_bytes])
        parts.append(part)
    return parts


def unpack_dir(parts_dir: Path, dest: Path) -> None:
    """The inverse of pack_dir (what `cat run.tar.part* | tar -x -C DEST` does)."""
    data = b"".join(p.read_bytes() for p in sorted(Path(parts_dir).glob("run.tar.part*")))
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")
