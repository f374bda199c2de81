"""The CPU recipe's student stage as one process with 2 threads and as 2 torchrun ranks (gloo) with 1 thread each:
wall time and accuracy of both, on real Fashion-MNIST, from one teacher.

    python bench/ddp_student.py --out DIR [--teacher-epochs 3] [--set KEY=VALUE ...] [--json FILE]

The teacher (the `fashion-mnist-cpu` recipe's resnet20, trained here for --teacher-epochs in one process, once)
is copied into a fresh run directory per configuration; each configuration then trains the recipe's student (KD
from that teacher, its epochs, its global batch of 128) and rank 0 measures its validation and test accuracy. No
speed-up is expected on 2 cores: the point is what the same stage costs and gives either way. Pause other work on
the machine while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "fashion-mnist-cpu"


def worker(args: argparse.Namespace) -> None:
    """One configuration's student stage (a rank, or the one process): teacher loaded, student trained, rank 0
    writes the figures."""
    import torch

    from reskd.cli import _parse_set
    from reskd.training import loop
    from reskd.training.batches import Normalizer
    from reskd.training.data import load_dataset
    from reskd.training.distributed import World
    from reskd.training.pipeline import Trainer
    from reskd.training.recipe import load_recipe

    world = World.from_env()
    device = world.start(torch.device("cpu"))
    recipe = load_recipe(RECIPE, _parse_set(args.set))
    trainer = Trainer(recipe, args.run_dir, resume=True, device=device, world=world)
    data = load_dataset(recipe.data).to(device)
    normalizer = Normalizer(data.mean, data.std, device)
    teacher = trainer.teacher(data, normalizer)
    assert not teacher.trained_now, "the teacher should have been loaded"
    started = time.perf_counter()
    student = trainer.kd_model("student", "student", recipe.student.spec, recipe.student.resolve(recipe.train),
                               recipe.student.kd_alpha, recipe.student.kd_temperature,
                               trainer.fingerprints()["student"], teacher, data, normalizer)
    seconds = time.perf_counter() - started
    if world.main:
        figures = {"world_size": world.size, "threads": torch.get_num_threads(), "student_seconds": seconds,
                   "epochs": len(student.history), "history": student.history}
        for name, split in (("val", data.val), ("test", data.test)):
            logits = loop.predict(student.model, split, normalizer=normalizer, device=device, batch_size=1000)
            figures[f"{name}_accuracy"] = 100 * float((logits.argmax(1) == split.labels.cpu()).float().mean())
        (args.run_dir / "student.json").write_text(json.dumps(figures, indent=1))
    world.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.set = [f"teacher.epochs={args.teacher_epochs}", *args.set]
    if args.worker:
        worker(args)
        return
    sets = [a for s in args.set for a in ("--set", s)]
    python = sys.executable
    base = args.out / "teacher"
    if not (base / "checkpoints" / "teacher.pt").is_file():  # the teacher, once: `reskd train` stopped after it
        print(f"training the teacher ({args.teacher_epochs} epochs)", file=sys.stderr, flush=True)
        code = ("import sys; from reskd.training.pipeline import Trainer; from reskd.training.recipe import "
                "load_recipe; from reskd.cli import _parse_set; "
                f"t = Trainer(load_recipe({RECIPE!r}, _parse_set(sys.argv[2:])), sys.argv[1], resume=True, "
                "device='cpu'); "
                "from reskd.training.data import load_dataset; from reskd.training.batches import Normalizer; "
                "d = load_dataset(t.recipe.data); t.teacher(d, Normalizer(d.mean, d.std, t.device))")
        subprocess.run([python, "-c", code, str(base), *args.set], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    results = {"recipe": RECIPE, "overrides": args.set, "configurations": {}}
    for name, cmd, threads in (
            ("1 rank x 2 threads", [python], "2"),
            ("2 ranks x 1 thread", [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
             "1")):
        run = args.out / name.replace(" ", "-")
        shutil.rmtree(run, ignore_errors=True)
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy2(base / "checkpoints" / "teacher.pt", run / "checkpoints" / "teacher.pt")
        started = time.perf_counter()
        subprocess.run([*cmd, __file__, "--worker", "--run-dir", str(run), "--out", str(args.out),
                        "--teacher-epochs", str(args.teacher_epochs), *sets[2:]], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        figures = json.loads((run / "student.json").read_text())
        figures["process_seconds"] = time.perf_counter() - started
        results["configurations"][name] = figures
        print(json.dumps({name: {k: v for k, v in figures.items() if k != "history"}}), flush=True)
    print(f"\nthe {RECIPE} student stage ({results['configurations']['1 rank x 2 threads']['epochs']} epochs, global "
          f"batch 128) from one teacher ({args.teacher_epochs} epochs), real Fashion-MNIST, on "
          f"{os.cpu_count()} cores:")
    for name, f in results["configurations"].items():
        print(f"  {name:<20} student {f['student_seconds']:7.0f} s (process {f['process_seconds']:.0f} s)  "
              f"val {f['val_accuracy']:.2f}%  test {f['test_accuracy']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
