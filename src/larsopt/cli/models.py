"""Models for ``larsopt train``: ``mlp``, ``cnn`` and ``resnet`` (with batch norm), sized for
small images (8x8 digits up to 32x32 CIFAR-10) and a CPU."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from larsopt.cli.errors import UsageError


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 256 ReLU units, any input shape (flattened)."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(math.prod(input_shape), 256)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(256, 256)), ("relu2", nn.ReLU()),
        ("classifier", nn.Linear(256, num_classes)),
    ]))


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Three 3x3 convolutions (32, 64, 128 channels, one 2x2 max-pool), global average pooling
    and a linear classifier; no normalisation layers."""
    channels = _image_channels(input_shape, "cnn")
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(channels, 32, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(64, 128, 3, padding=1)), ("relu3", nn.ReLU()),
        ("global_pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("classifier", nn.Linear(128, num_classes)),
    ]))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and an identity (or 1x1
    projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem and three basic blocks (32, 64, 128 channels, the last two
    with stride 2), global average pooling, a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def resnet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """See :class:`ResNet`."""
    return ResNet(_image_channels(input_shape, "resnet"), num_classes)


def _image_channels(input_shape: tuple[int, ...], model: str) -> int:
    if len(input_shape) != 3:
        raise UsageError(f"--model {model} needs images (N, C, H, W) or (N, H, W); this data has samples of "
                         f"shape {input_shape}: use --model mlp")
    return input_shape[0]


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for samples of ``input_shape``."""
    if name not in MODELS:
        raise UsageError(f"--model {name!r}: unknown model; expected one of {', '.join(MODELS)}")
    return MODELS[name](input_shape, num_classes)
