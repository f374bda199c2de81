"""FLOPs and parameters per model, counted by torch.utils.flop_counter (FLOPs = 2 x multiply-accumulates; it counts
convolutions and matrix products, not batch-norm, activations or additions)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass at batch 1, on CPU in eval mode (the model's own mode and device are restored)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
