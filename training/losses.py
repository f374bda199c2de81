"""Losses of the three kinds of stage (docs/design.md, "The method and the exit rule")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton KD: alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
    The T^2 keeps the soft term's gradient scale independent of T. weights: per-sample, mean 1 (None: equal)."""
    if weights is None:
        ce = F.cross_entropy(student, labels)
        kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                      reduction="batchmean", log_target=True)
    else:
        ce = (weights * F.cross_entropy(student, labels, reduction="none")).mean()
        kl = (weights * F.kl_div(F.log_softmax(student / temperature, dim=-1),
                                 F.log_softmax(teacher / temperature, dim=-1), reduction="none",
                                 log_target=True).sum(-1)).mean()
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(logits, labels)
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()


def reach_weights(cascade: torch.Tensor) -> torch.Tensor:
    """How likely each sample is to still be in the cascade when the next stage runs: 1 - its max softmax
    probability so far (a confident sample exits before), normalised to mean 1 over the batch."""
    w = 1.0 - F.softmax(cascade.float(), dim=-1).amax(dim=-1)
    return w / w.mean().clamp_min(1e-8)


def centre(logits: torch.Tensor) -> torch.Tensor:
    """Remove the per-sample mean over classes: softmax cannot see it, so neither should the residual loss."""
    return logits - logits.mean(dim=-1, keepdim=True)


def residual_target(teacher: torch.Tensor, cascade: torch.Tensor) -> torch.Tensor:
    """What a res-student learns: the centred knowledge gap between the teacher and the cascade so far."""
    return centre(teacher - cascade)


def residual_mse(prediction: torch.Tensor, target: torch.Tensor, scale_sq: float,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of the centred prediction, summed over classes, averaged over samples, divided by scale_sq.
    With scale_sq = the target's mean squared norm at the start of the stage, the loss starts at 1 for a zero
    prediction and reads as the fraction of the gap not yet explained, commensurate with a CE term.

    A residual of temperature-softened logits, centre(z_T / T - z / T), is this target divided by T (centring is
    linear, and log-softmax only subtracts a per-sample constant), so after the division by scale_sq it is the
    same loss: softening is a lever only for the KD term on the combined logits."""
    error = ((centre(prediction) - target) ** 2).sum(dim=-1)
    return (error.mean() if weights is None else (weights * error).mean()) / scale_sq
