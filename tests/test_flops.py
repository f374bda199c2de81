"""FLOPs = 2 x multiply-accumulates, checked against hand counts."""

from torch import nn

from reskd.training.flops import count_flops, count_params
from reskd.training.models import ModelSpec, build_model


def test_conv_flops_match_hand_count():
    conv = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
    # each of 16 x 32 x 32 outputs takes 3 x 3 x 3 multiply-adds
    assert count_flops(conv, (3, 32, 32)) == 2 * 16 * 32 * 32 * 3 * 3 * 3


def test_strided_conv_and_linear():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    conv = 2 * 8 * 14 * 14 * 1 * 3 * 3
    linear = 2 * (8 * 14 * 14) * 10
    assert count_flops(model, (1, 28, 28)) == conv + linear


def test_resnet8_matches_hand_count():
    # resnet8 on 1x28x28: stem, one basic block per stage (two 3x3 convs), 1x1 projections at the two downsamples.
    def conv(cin, cout, k, hw):
        return 2 * cin * cout * k * k * hw * hw

    expected = (conv(1, 16, 3, 28)
                + conv(16, 16, 3, 28) * 2
                + conv(16, 32, 3, 14) + conv(32, 32, 3, 14) + conv(16, 32, 1, 14)
                + conv(32, 64, 3, 7) + conv(64, 64, 3, 7) + conv(32, 64, 1, 7)
                + 2 * 64 * 10)
    model = build_model(ModelSpec("resnet8"), 1, 10)
    assert count_flops(model, (1, 28, 28)) == expected
    assert model.training  # counting restores the mode it found


def test_params():
    assert count_params(nn.Linear(10, 3)) == 33
