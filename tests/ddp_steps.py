"""A few training steps of one model through training.loop.fit, as one process or as a rank under torchrun
(tests/test_distributed.py): the same synthetic images, seed, augmentations (crop, flip, erasing) and global batch
either way. Writes OUT/weights-rank<R>.pt (every rank's weights after the run) and, with --diverge, tries
World.settle after rank 1's weights were nudged and writes what it raised to OUT/diverged-rank<R>.txt; and
OUT/threads-rank<R>.txt: how many threads Python did not start the process has before World.start and after
World.stop.

    python tests/ddp_steps.py OUT [--sync-bn] [--diverge]
    torchrun --standalone --nproc-per-node 2 tests/ddp_steps.py OUT [--sync-bn] [--diverge]
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import numpy as np
import torch

from reskd.training import loop
from reskd.training.batches import Normalizer
from reskd.training.data import TensorSplit
from reskd.training.distributed import DistributedError, World, sync_batchnorm
from reskd.training.models import ModelSpec, build_model
from reskd.training.recipe import TrainConfig

IMAGES, BATCH, EPOCHS = 96, 32, 2  # 3 steps an epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--sync-bn", action="store_true")
    ap.add_argument("--diverge", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World.from_env()
    before = threads()
    device = world.start(torch.device("cpu"), timeout_s=60)
    steps(world, device, args)
    world.stop()
    # The process group freed by World.stop, its threads joined: what an exiting rank needs (World.stop).
    (args.out / f"threads-rank{world.rank}.txt").write_text(f"{before} {threads()}")


def threads() -> int:
    """The process's threads that Python did not start (torch's and gloo's; tqdm's monitor, say, is not one)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def steps(world: World, device: torch.device, args: argparse.Namespace) -> None:
    """The training steps, their weights written; the wrapped model is out of reach once this returns."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 1, 12, 12), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (IMAGES,), generator=g)
    train = TensorSplit(images, labels, np.arange(IMAGES))
    torch.manual_seed(1)
    model = build_model(ModelSpec("resnet8", 0.25), 1, 10)
    if args.sync_bn and world.distributed:
        model = sync_batchnorm(model, device)
    net = world.wrap(model, device)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=0.05, crop_padding=2, flip=True, random_erasing=0.5,
                      autocast="fp32", channels_last=False)

    def step(x, y):
        logits = net(x).float()
        return torch.nn.functional.cross_entropy(logits, y), logits

    history = loop.fit(model, step, train, cfg, normalizer=Normalizer([0.5], [0.25], device), device=device,
                       seed=3, desc="steps", world=world)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "history": history}, args.out / f"weights-rank{world.rank}.pt")
    if args.diverge:
        if world.rank == 1:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
        try:
            world.settle(model, "after the nudge")
            outcome = "settled"
        except DistributedError as err:
            outcome = str(err)
        (args.out / f"diverged-rank{world.rank}.txt").write_text(outcome)


if __name__ == "__main__":
    main()
