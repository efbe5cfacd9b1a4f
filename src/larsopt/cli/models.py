"""Models for ``larsopt train``: ``mlp``, ``cnn`` and ``resnet`` (with batch norm), sized for
small images (8x8 digits up to 32x32 CIFAR-10) and a CPU, or ``module:callable``, the user's own."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable

import torch
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


def _user_model(spec: str) -> Callable[..., object]:
    """The callable named by ``module:callable`` (a dotted attribute path after the colon),
    imported with the current folder on the import path, as ``python -m`` would have it."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--model {spec}: cannot import {module_name} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"--model {spec}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"--model {spec}: {attribute} is not callable")
    return target


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`, or ``module:callable`` called as
    ``callable(input_shape, num_classes)``) for samples of ``input_shape``."""
    if name in MODELS:
        return MODELS[name](input_shape, num_classes)
    if ":" not in name:
        raise UsageError(f"--model {name!r}: unknown model; expected one of {', '.join(MODELS)} or module:callable")
    make = _user_model(name)
    try:
        model = make(input_shape, num_classes)
    except Exception as error:  # the user's code: any failure is theirs to read, in one line
        raise UsageError(f"--model {name}: calling it with input_shape={input_shape}, num_classes={num_classes} "
                         f"failed ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {name}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


@torch.no_grad()
def check_fits(model: nn.Module, name: str, samples: Tensor, num_classes: int) -> None:
    """Run ``model`` on a couple of training samples in eval mode (no statistics, no randomness
    change) so that a model the data does not fit fails before any file is written."""
    was_training = model.training
    model.eval()
    try:
        logits = model(samples)
    except Exception as error:  # shape errors come as RuntimeError, ValueError, IndexError...
        raise UsageError(f"--model {name} does not fit samples of shape {tuple(samples.shape[1:])} "
                         f"({type(error).__name__}: {_first_line(error)})") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (len(samples), num_classes):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UsageError(f"--model {name}: returns {shape} for a batch of {len(samples)}; expected logits of "
                         f"shape ({len(samples)}, {num_classes})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
