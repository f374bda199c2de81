"""Seconds per training epoch of each stage of the Fashion-MNIST recipes on this machine's CPU, in fp32 and with
bf16 autocast and/or channels_last: what a CPU training schedule is planned from.

    python bench/cpu_train_speed.py [--steps 12] [--threads N] [--modes bf16+channels_last,...] [--json FILE]

Each stage's real step at batch 128 on 1x28x28 images: the teacher (resnet20, cross-entropy), the student
(resnet8x0.5, KD: the frozen teacher's forward in the step), the feature head (head2x0.75 on the student's 7x7x32
map, CE + KD on the combined logits: teacher and student forwards in the step) and the KD baselines (resnet8,
resnet14). Forward, backward and an SGD step, timed after 3 warm-up steps, median of `--steps`; an epoch is 429
steps (55,000 training images). Data loading and augmentation are left out (in-memory tensors, a few % of a step
here). Run it with nothing else on the machine: it measures the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from reskd.training.losses import kd_loss
from reskd.training.models import ModelSpec, build_model

STEPS_PER_EPOCH = 55_000 // 128
MODES = {"fp32": (False, False), "channels_last": (False, True), "bf16": (True, False),
         "bf16+channels_last": (True, True)}


def stage_steps(channels_last: bool):
    """name -> (the trained module, a step function (x, y) -> loss)."""
    def make(arch: str, width: float = 1.0, cin: int = 1):
        model = build_model(ModelSpec(arch, width), cin, 10)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    teacher, student = make("resnet20").eval(), make("resnet8", 0.5)
    frozen_student = make("resnet8", 0.5).eval()
    head = make("head2", 0.75, cin=32)
    kd8, kd14 = make("resnet8"), make("resnet14")

    def kd_step(model):
        def step(x, y):
            with torch.no_grad():
                t = teacher(x).float()
            return kd_loss(model(x).float(), t, y, 0.1, 4.0)
        return step

    def head_step(x, y):
        with torch.no_grad():
            t = teacher(x).float()
            features = frozen_student.features(x)
            prev = frozen_student.logits_from_features(features).float()
        z = prev + head(features).float()
        return F.cross_entropy(z, y) + kd_loss(z, t, y, 0.0, 4.0)

    return {"teacher resnet20 (CE)": (make("resnet20"), None),
            "student resnet8x0.5 (KD)": (student, kd_step(student)),
            "feature head head2x0.75 (CE+KD)": (head, head_step),
            "KD resnet8": (kd8, kd_step(kd8)),
            "KD resnet14": (kd14, kd_step(kd14))}


def time_steps(model, step, bf16: bool, channels_last: bool, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(128, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    step = step or (lambda x, y: F.cross_entropy(model(x).float(), y))
    times = []
    model.train()
    for i in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--json")
    args = ap.parse_args()
    modes = {m: MODES[m] for m in args.modes.split(",")} if all(m in MODES for m in args.modes.split(",")) else \
        ap.error(f"--modes: choose among {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "batch": 128, "steps_per_epoch": STEPS_PER_EPOCH, "seconds_per_epoch": {}}
    print(f"{results['machine']}; torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per "
          f"epoch ({STEPS_PER_EPOCH} steps of 128)")
    print(f"{'stage':<34}" + "".join(f"{m:>20}" for m in modes))
    rows = {}
    for mode, (bf16, channels_last) in modes.items():
        torch.manual_seed(0)
        for name, (model, step) in stage_steps(channels_last).items():
            rows.setdefault(name, {})[mode] = STEPS_PER_EPOCH * time_steps(model, step, bf16, channels_last,
                                                                           args.steps)
    for name, by_mode in rows.items():
        print(f"{name:<34}" + "".join(f"{by_mode[m]:>20.1f}" for m in modes))
    results["seconds_per_epoch"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
