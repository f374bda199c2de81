"""One training loop for every stage: SGD + Nesterov, a one-cycle or cosine schedule, bf16 autocast and
channels_last (on CUDA; on the CPU where the recipe asks), a progress bar with loss and accuracy. What a stage optimises is its `step` function.
After every epoch the loop hands out where it stands (Progress); given that back it goes on from the next epoch."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .batches import Augmentation, Normalizer, batches
from .data import Split
from .distributed import SINGLE, World
from .recipe import TrainConfig

# step(images, labels) -> (loss, logits used for the running accuracy)
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Progress:
    """Training after a finished epoch: enough for `fit` to go on with the next epoch as if it had never stopped
    (the batches of an epoch depend on the seed and the epoch alone)."""

    history: list[dict]  # one entry per finished epoch
    model: dict[str, torch.Tensor]
    optimizer: dict
    schedule: dict
    rng: dict[str, torch.Tensor]  # "cpu", and "cuda" when training there: dropout draws from the global RNG

    @property
    def epoch(self) -> int:
        """Epochs finished."""
        return len(self.history)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def uses_bf16(device: torch.device, cfg: TrainConfig) -> bool:
    """Whether training steps compute in bf16 autocast: the recipe's `autocast`, "auto" meaning on CUDA only."""
    return cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")


def uses_channels_last(device: torch.device, cfg: TrainConfig) -> bool:
    """Whether models and batches are channels_last: the recipe's `channels_last`, absent meaning on CUDA only."""
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last


def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast on `device` when bf16 (default: on CUDA, where it is always used), else nothing."""
    if bf16 if bf16 is not None else device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool | None = None) -> torch.nn.Module:
    """The model on `device`, channels_last when asked (default: on CUDA)."""
    model = model.to(device)
    if channels_last if channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step lr factor: linear warm-up, then cosine annealing to zero.
    onecycle: warm-up over the first quarter of training from lr/25 (the one-cycle policy; fast and robust at short
    budgets). cosine: warm-up over `warmup_epochs` (none by default), then cosine."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        warmup, start = max(1, int(0.25 * total)), 1 / 25
    else:
        warmup, start = int(cfg.warmup_epochs * steps_per_epoch), 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(model: torch.nn.Module, step: StepFn, train: Split, cfg: TrainConfig, *, normalizer: Normalizer,
        device: torch.device, seed: int, desc: str, resume: Progress | None = None,
        on_epoch: Callable[[Progress], None] | None = None, world: World = SINGLE) -> list[dict]:
    """Train `model` in place; returns the per-epoch history [{epoch, loss, accuracy, lr, seconds}].
    on_epoch receives the Progress after every epoch (its tensors are the live ones: save or copy them at once);
    resume, one such Progress of an earlier call with the same arguments, continues from the epoch after it.
    world: with several ranks each trains on its share of every batch (cfg.batch_size is the global batch) and
    `step` must run the model under DistributedDataParallel; the history counts every rank's samples, and the
    ranks' weights are compared after each epoch (World.settle). Rank 0 alone reports and gets on_epoch."""
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{desc}: batch_size {cfg.batch_size} exceeds the {len(train)} training images")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    history = []
    bf16, channels_last = uses_bf16(device, cfg), uses_channels_last(device, cfg)
    started = time.time()
    if resume is not None:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.schedule)
        set_rng_state(resume.rng, device)
        history = list(resume.history)
        started -= history[-1]["seconds"]  # the history's seconds count on from where the earlier call stopped
    for epoch in range(len(history), cfg.epochs):
        model.train()
        total_loss = torch.zeros((), device=device)
        total_correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(batches(train, cfg.batch_size, normalizer=normalizer, device=device, shuffle=True,
                           seed=seed * 1000 + epoch, augmentation=Augmentation.of(cfg), drop_last=True,
                           shard=world.shard(cfg.batch_size) if world.distributed else None),
                   total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (world.main and sys.stderr.isatty()), dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, bf16):
                loss, logits = step(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            total_loss += loss.detach().float() * len(y)
            total_correct += (logits.detach().argmax(-1) == y).sum()
            seen += len(y)
            if i % 20 == 0:  # a sync every step would stall the GPU
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{total_correct.item() / seen:.4f}")
        total_loss, total_correct, seen = world.sum(total_loss, total_correct, torch.tensor(seen))
        record = {"epoch": epoch + 1, "loss": total_loss.item() / seen.item(),
                  "accuracy": total_correct.item() / seen.item(), "lr": opt.param_groups[0]["lr"],
                  "seconds": round(time.time() - started, 1)}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"{desc}: loss became {record['loss']} in epoch {epoch + 1}; lower the lr")
        history.append(record)
        world.settle(model, f"{desc} epoch {epoch + 1}")
        if not world.main:
            continue
        print(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} train-acc {record['accuracy']:.4f} "
              f"({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(Progress(list(history), model.state_dict(), opt.state_dict(), sched.state_dict(),
                              rng_state(device)))
    model.eval()
    return history


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, *, normalizer: Normalizer, device: torch.device,
            batch_size: int) -> torch.Tensor:
    """float32 logits [N, classes] on CPU, in split order, eval mode."""
    model.eval()
    outs = []
    for x, _ in batches(split, batch_size, normalizer=normalizer, device=device):
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            outs.append(model(x).float().cpu())
    return torch.cat(outs)
