import pytest
import torch

from reskd.training.models import ModelSpec, available_models, build_model, parse_tag


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "wrn16_4",
                                  "wrn28_10", "wrn40_4"])
def test_registry_has_the_families(name):
    assert name in available_models()


@pytest.mark.parametrize("arch,channels,classes,size", [("resnet8", 1, 10, 28), ("resnet20", 3, 100, 32),
                                                        ("wrn16_2", 3, 200, 64), ("wrn16_1", 1, 7, 12)])
def test_any_input_channels_and_classes(arch, channels, classes, size):
    model = build_model(ModelSpec(arch), channels, classes).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, classes)
    assert isinstance(model.fc, torch.nn.Linear)


def test_depth_and_width_set_the_size():
    def params(spec):
        return sum(p.numel() for p in build_model(spec, 3, 10).parameters())

    assert params(ModelSpec("resnet8")) < params(ModelSpec("resnet20")) < params(ModelSpec("resnet56"))
    # Width scales channels, so conv parameters grow about quadratically.
    assert 3.5 < params(ModelSpec("resnet20", 2.0)) / params(ModelSpec("resnet20")) < 4.1
    first = build_model(ModelSpec("resnet8", 0.5), 1, 10).conv1
    assert first.out_channels == 8


def test_unknown_model_and_bad_width_are_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8"):
        build_model(ModelSpec("resnet9"), 3, 10)
    with pytest.raises(ValueError, match="width multiplier"):
        build_model(ModelSpec("resnet8", 0.0), 3, 10)


def test_tags_round_trip():
    for spec in (ModelSpec("resnet8"), ModelSpec("resnet8", 0.5), ModelSpec("wrn16_4", 2.0)):
        assert parse_tag(spec.tag) == spec
