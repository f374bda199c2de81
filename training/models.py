"""Image classifiers built by name from a registry (timm-style): a recipe says `resnet20` and gets one.

Two families, both sized for small images (28x28 to 64x64) and any number of input channels and classes:
- CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of basic blocks at 16/32/64
  channels, times a width multiplier. resnet8 ... resnet110.
- Wide ResNets (Zagoruyko & Komodakis 2016): depth 6n+4, pre-activation blocks at 16k/32k/64k channels.
- Heads (`head1`, `head2`, `head3`): 1-3 basic blocks at 64 x width channels on a feature map instead of an image,
  for res-students that read the student's last feature map; `in_channels` is then the map's channels.
Every model ends in `.fc` (a Linear layer), so a res-student's output can be zero-initialised uniformly, and every
image model has `features(x)`, its last feature map before pooling, and `logits_from_features(f)`, the rest of its
forward pass (so an exported student can give both without computing the map twice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(factory: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ModelSpec:
    """What a recipe names: an architecture and a width multiplier (1.0 = the published size)."""

    arch: str
    width: float = 1.0

    @property
    def tag(self) -> str:
        return self.arch if self.width == 1.0 else f"{self.arch}x{self.width:g}"


def build_model(spec: ModelSpec, in_channels: int, num_classes: int) -> nn.Module:
    if spec.arch not in _REGISTRY:
        raise ValueError(f"unknown model {spec.arch!r}; available: {', '.join(available_models())}")
    if not spec.width > 0:
        raise ValueError(f"width multiplier must be > 0, got {spec.width}")
    return _REGISTRY[spec.arch](in_channels=in_channels, num_classes=num_classes, width=spec.width)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            # Projection shortcut (option B): a 1x1 conv keeps the graph plain for ONNX export.
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


class FeatureHead(nn.Module):
    """Basic blocks at stride 1 on a feature map, then pooling and a linear layer: a res-student that reads what
    the student computed instead of starting again from the pixels."""

    def __init__(self, blocks: int, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        channels = _scaled(64, width)
        layers, cin = [], in_channels
        for _ in range(blocks):
            layers.append(BasicBlock(cin, channels, stride=1))
            cin = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(features), 1), 1))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # Pre-activation: when the shortcut projects, it reads the activated input, as in the paper.
        return out + (self.shortcut(pre) if not isinstance(self.shortcut, nn.Identity) else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, width: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [_scaled(c, width) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layers(self.conv1(x))))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


for _blocks in (1, 2, 3):
    register(f"head{_blocks}")(
        lambda in_channels, num_classes, width, _b=_blocks: FeatureHead(_b, in_channels, num_classes, width)
    )

for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(
        lambda in_channels, num_classes, width, _d=_depth: CifarResNet(_d, in_channels, num_classes, width)
    )

for _depth, _widen in ((16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 4), (28, 10), (40, 1), (40, 2), (40, 4)):
    register(f"wrn{_depth}_{_widen}")(
        lambda in_channels, num_classes, width, _d=_depth, _k=_widen: WideResNet(_d, _k, in_channels, num_classes,
                                                                                 width)
    )

_TAG = re.compile(r"^(?P<arch>[a-z0-9_]+?)(?:x(?P<width>[0-9.]+))?$")


def parse_tag(tag: str) -> ModelSpec:
    """Inverse of ModelSpec.tag: 'resnet8x0.5' -> ModelSpec('resnet8', 0.5)."""
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"cannot read model tag {tag!r}")
    return ModelSpec(m["arch"], float(m["width"]) if m["width"] else 1.0)
