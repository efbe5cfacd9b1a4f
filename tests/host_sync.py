"""Counting host synchronisations: the tensor -> Python conversions a step makes."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class ConversionCounter(TorchFunctionMode):
    """Counts tensor -> Python conversions: each one is a host synchronisation on an accelerator."""

    CONVERSIONS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
                   torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.CONVERSIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))
