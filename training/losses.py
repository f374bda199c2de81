"""Losses of the three kinds of stage (docs/design.md, "The method and the exit rule")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """Hinton KD: alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
    The T^2 keeps the soft term's gradient scale independent of T."""
    ce = F.cross_entropy(student, labels)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl


def centre(logits: torch.Tensor) -> torch.Tensor:
    """Remove the per-sample mean over classes: softmax cannot see it, so neither should the residual loss."""
    return logits - logits.mean(dim=-1, keepdim=True)


def residual_target(teacher: torch.Tensor, cascade: torch.Tensor) -> torch.Tensor:
    """What a res-student learns: the centred knowledge gap between the teacher and the cascade so far."""
    return centre(teacher - cascade)


def residual_mse(prediction: torch.Tensor, target: torch.Tensor, scale_sq: float) -> torch.Tensor:
    """Squared error of the centred prediction, summed over classes, averaged over samples, divided by scale_sq.
    With scale_sq = the target's mean squared norm at the start of the stage, the loss starts at 1 for a zero
    prediction and reads as the fraction of the gap not yet explained, commensurate with a CE term."""
    return ((centre(prediction) - target) ** 2).sum(dim=-1).mean() / scale_sq
