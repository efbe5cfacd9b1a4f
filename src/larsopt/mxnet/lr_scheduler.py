"""MXNet 2.0's learning-rate schedulers (``mxnet.lr_scheduler``), with the same arguments and numbers.

A scheduler is a stateful callable ``scheduler(num_update) -> lr``; the optimizer calls it with
its ``num_update`` (the largest per-index update count, starting at ``begin_num_update + 1``).
Any such callable works as ``lr_scheduler``; these classes reproduce MXNet's, including what
follows from their attributes:

* Warm-up (all four): for ``num_update < warmup_steps`` the lr is
  ``warmup_begin_lr + (base_lr - warmup_begin_lr) * num_update / warmup_steps`` (``"linear"``)
  or ``warmup_begin_lr`` (``"constant"``), where ``base_lr`` is the value given at construction.
* The optimizer's ``learning_rate`` overwrites ``scheduler.base_lr`` only. ``FactorScheduler``
  and ``MultiFactorScheduler`` decay from ``base_lr``, so they follow the overwrite;
  ``PolyScheduler`` and ``CosineScheduler`` decay from ``base_lr_orig`` (the constructor's
  value), so after warm-up they ignore it, as in MXNet.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

from larsopt.mxnet import _checks
from larsopt.mxnet.errors import MXNetAssertionError, MXNetAssertionTypeError

_LOG = logging.getLogger(__name__)

WARMUP_MODES = ("linear", "constant")


def _check_int(name: str, value: Any) -> int:
    """MXNet's ``assert isinstance(value, int)``, NumPy integers included; returns a Python int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise MXNetAssertionTypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


class LRScheduler:
    """Base class: ``base_lr`` plus the optional warm-up shared by every scheduler.

    Args:
        base_lr: the initial learning rate (and the end of the warm-up).
        warmup_steps: number of updates (an int >= 0) spent warming up before the schedule.
        warmup_begin_lr: the lr the warm-up starts from (at most ``base_lr``).
        warmup_mode: ``"linear"`` (equal increments) or ``"constant"`` (``warmup_begin_lr``
            throughout the warm-up).
    """

    def __init__(
        self,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        warmup_steps = _check_int("warmup_steps", warmup_steps)
        _checks.real("base_lr", base_lr)
        _checks.real("warmup_begin_lr", warmup_begin_lr)
        if not isinstance(warmup_mode, str):
            raise TypeError(f"warmup_mode must be one of {WARMUP_MODES}, got {warmup_mode!r}")
        if warmup_begin_lr > base_lr:
            raise ValueError("Base lr has to be higher than warmup_begin_lr")
        if warmup_steps < 0:
            raise ValueError("Warmup steps has to be positive or 0")
        if warmup_mode not in WARMUP_MODES:
            raise ValueError("Supports only linear and constant modes of warmup")
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.warmup_final_lr = base_lr
        self.warmup_begin_lr = warmup_begin_lr
        self.warmup_mode = warmup_mode

    def get_warmup_lr(self, num_update: int) -> float:
        """The warm-up lr at ``num_update`` (which must be below ``warmup_steps``)."""
        if num_update >= self.warmup_steps:
            raise MXNetAssertionError(f"num_update={num_update} is past the warm-up ({self.warmup_steps} steps)")
        if self.warmup_mode == "constant":
            return self.warmup_begin_lr
        increase = (self.warmup_final_lr - self.warmup_begin_lr) * float(num_update) / float(self.warmup_steps)
        return self.warmup_begin_lr + increase

    def __call__(self, num_update: int) -> float:
        """The learning rate after ``num_update`` updates (the largest per-weight count)."""
        raise NotImplementedError("a scheduler must define __call__")


class FactorScheduler(LRScheduler):
    """Multiply the lr by ``factor`` every ``step`` updates, never going below ``stop_factor_lr``.

    After warm-up: ``base_lr * factor ** floor((num_update - 1) / step)`` (clamped at
    ``stop_factor_lr``). The decay is applied incrementally to ``base_lr``, as in MXNet.
    """

    def __init__(
        self,
        step: int,
        factor: float = 1,
        stop_factor_lr: float = 1e-8,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        for name, value in (("step", step), ("factor", factor), ("stop_factor_lr", stop_factor_lr)):
            _checks.real(name, value)
        if step < 1:
            raise ValueError("Schedule step must be greater or equal than 1 round")
        if factor > 1.0:
            raise ValueError("Factor must be no more than 1 to make lr reduce")
        self.step = step
        self.factor = factor
        self.stop_factor_lr = stop_factor_lr
        self.count = 0

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        # A loop, not a formula: resuming at a large num_update applies every missed decay.
        while num_update > self.count + self.step:
            self.count += self.step
            self.base_lr *= self.factor
            if self.base_lr < self.stop_factor_lr:
                self.base_lr = self.stop_factor_lr
                _LOG.info("Update[%d]: now learning rate arrived at %0.5e, will not change in the future",
                          num_update, self.base_lr)
            else:
                _LOG.info("Update[%d]: Change learning rate to %0.5e", num_update, self.base_lr)
        return self.base_lr


class MultiFactorScheduler(LRScheduler):
    """Multiply the lr by ``factor`` each time ``num_update`` passes one of the increasing ``step`` values.

    After warm-up: ``base_lr * factor ** k`` where ``k`` counts the entries of ``step`` strictly
    below ``num_update``.
    """

    def __init__(
        self,
        step: list[int],
        factor: float = 1,
        base_lr: float = 0.01,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        if not isinstance(step, list):
            raise MXNetAssertionTypeError(f"step must be a non-empty list of ints, got {step!r}")
        if not step:
            raise MXNetAssertionError(f"step must be a non-empty list of ints, got {step!r}")
        for i, boundary in enumerate(step):
            _checks.real(f"step[{i}]", boundary)
            if i != 0 and step[i] <= step[i - 1]:
                raise ValueError("Schedule step must be an increasing integer list")
            if boundary < 1:
                raise ValueError("Schedule step must be greater or equal than 1 round")
        _checks.real("factor", factor)
        if factor > 1.0:
            raise ValueError("Factor must be no more than 1 to make lr reduce")
        self.step = step
        self.cur_step_ind = 0
        self.factor = factor
        self.count = 0

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        while self.cur_step_ind < len(self.step) and num_update > self.step[self.cur_step_ind]:
            self.count = self.step[self.cur_step_ind]
            self.cur_step_ind += 1
            self.base_lr *= self.factor
            _LOG.info("Update[%d]: Change learning rate to %0.5e", num_update, self.base_lr)
        return self.base_lr


class _DecayToFinalScheduler(LRScheduler):
    """After warm-up, ``final_lr + (base_lr_orig - final_lr) * decay(progress)`` with ``progress``
    going from 0 to 1 over ``max_update - warmup_steps`` updates; past ``max_update`` the last value
    is kept (``final_lr`` once ``max_update`` was reached). Poly and Cosine differ only in ``decay``."""

    def __init__(
        self,
        max_update: int,
        base_lr: float,
        final_lr: float,
        warmup_steps: int,
        warmup_begin_lr: float,
        warmup_mode: str,
    ) -> None:
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        max_update = _check_int("max_update", max_update)
        _checks.real("final_lr", final_lr)
        if max_update < 1:
            raise ValueError("maximum number of updates must be strictly positive")
        # A copy taken here: an optimizer's later overwrite of base_lr does not reach the decay (as MXNet).
        self.base_lr_orig = self.base_lr
        self.max_update = max_update
        self.final_lr = final_lr
        self.max_steps = self.max_update - self.warmup_steps

    def decay(self, progress: float) -> float:
        """The decay factor, from 1 at ``progress == 0`` to 0 at ``progress == 1``."""
        raise NotImplementedError

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        if num_update <= self.max_update:
            progress = float(num_update - self.warmup_steps) / float(self.max_steps)
            self.base_lr = self.final_lr + (self.base_lr_orig - self.final_lr) * self.decay(progress)
        return self.base_lr


class PolyScheduler(_DecayToFinalScheduler):
    """Polynomial decay: ``decay(progress) = (1 - progress) ** pwr`` (see the base class)."""

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        pwr: float = 2,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        _checks.real("pwr", pwr)
        self.power = pwr

    def decay(self, progress: float) -> float:
        return pow(1 - progress, self.power)


class CosineScheduler(_DecayToFinalScheduler):
    """Cosine decay: ``decay(progress) = (1 + cos(pi * progress)) / 2`` (see the base class)."""

    def __init__(
        self,
        max_update: int,
        base_lr: float = 0.01,
        final_lr: float = 0,
        warmup_steps: int = 0,
        warmup_begin_lr: float = 0,
        warmup_mode: str = "linear",
    ) -> None:
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)

    def decay(self, progress: float) -> float:
        return (1 + math.cos(math.pi * progress)) / 2


__all__ = ["LRScheduler", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler"]
