import pytest
import torch
import torch.nn.functional as F

from reskd.training.losses import centre, kd_loss, residual_mse, residual_target


def test_residual_target_is_the_centred_gap():
    teacher = torch.tensor([[3.0, 1.0, -1.0], [0.0, 0.0, 6.0]])
    cascade = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    gap = teacher - cascade  # [[2, 0, -2], [-2, 0, 5]]
    expected = torch.tensor([[2.0, 0.0, -2.0], [-3.0, -1.0, 4.0]])
    assert torch.allclose(residual_target(teacher, cascade), expected)
    assert torch.allclose(residual_target(teacher, cascade).sum(-1), torch.zeros(2))
    assert torch.allclose(residual_target(teacher, cascade), gap - gap.mean(-1, keepdim=True))


def test_residual_mse_ignores_a_per_sample_shift_and_is_normalised():
    target = residual_target(torch.randn(8, 10), torch.randn(8, 10))
    shifted = target + torch.randn(8, 1) * 5  # softmax cannot see this shift; the loss must not either
    assert residual_mse(shifted, target, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    scale_sq = (target ** 2).sum(-1).mean().item()
    # A zero prediction leaves the whole gap: with the stage's initial scale the loss reads 1.
    assert residual_mse(torch.zeros_like(target), target, scale_sq).item() == pytest.approx(1.0, rel=1e-5)


def test_kd_loss_is_ce_at_alpha_one_and_zero_when_matching_at_alpha_zero():
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    assert kd_loss(s, t, y, 1.0, 4.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert kd_loss(t, t, y, 0.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, t, y, 0.0, 4.0).item() > 0


def test_centre():
    z = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(centre(z), torch.tensor([[-2.0, -1.0, 3.0]]))
