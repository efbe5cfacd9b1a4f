"""Learning-rate schedules of the LARS recipes, as torch LR schedulers."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PolynomialDecayWithWarmup"]


class PolynomialDecayWithWarmup(LRScheduler):
    """The MLPerf ResNet-50 reference schedule (mlcommons/training, resnet-tf2 ``lars_util.py``):
    linear warm-up from 0, then power-2 polynomial decay to ``end_learning_rate``.

    With ``w = warmup_epochs * steps_per_epoch`` warm-up steps and ``D = train_steps - w + 1``::

        lr(step) = initial * step / w                                     for step <= w
                 = (initial - end) * (1 - min(max(step - w, 1), D) / D) ** 2 + end   after

    ``step`` counts optimizer steps from 0 (the first step runs at lr 0, as the reference's does);
    call :meth:`step` after each ``optimizer.step()``. Defaults by global ``batch_size``, as the
    reference picks them: initial lr 10 and 5 warm-up epochs below 16,384; 25 and 5 below 32,768;
    31.2 and 25 above. ``initial_learning_rate`` and ``end_learning_rate`` override them when given
    and not 0 (the reference tests them for truth), ``warmup_epochs`` when not ``None``;
    ``end_learning_rate`` defaults to 1e-4. Every param group gets the same lr (the reference has
    one); ``compute_lr_on_cpu`` and ``name`` only matter to TensorFlow and are accepted for
    compatibility. With no warm-up (``warmup_epochs=0``) the decay starts at step 0, where the
    reference divides 0 by 0."""

    def __init__(self, optimizer: Optimizer, batch_size: int, steps_per_epoch: int, train_steps: int,
                 initial_learning_rate: float | None = None, end_learning_rate: float | None = None,
                 warmup_epochs: float | None = None, compute_lr_on_cpu: bool = False, name: str | None = None,
                 last_epoch: int = -1) -> None:
        for label, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                             ("train_steps", train_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {label}: {value!r}; expected an integer >= 1")
        if warmup_epochs is not None and (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float))
                                          or warmup_epochs < 0):
            raise ValueError(f"Invalid warmup_epochs: {warmup_epochs!r}; expected None or a number >= 0")
        if batch_size < 16384:
            initial, warmup = 10.0, 5
        elif batch_size < 32768:
            initial, warmup = 25.0, 5
        else:
            initial, warmup = 31.2, 25
        self.initial_learning_rate = float(initial_learning_rate) if initial_learning_rate else initial
        self.end_learning_rate = float(end_learning_rate) if end_learning_rate else 0.0001
        self.warmup_epochs = warmup if warmup_epochs is None else warmup_epochs
        self.warmup_steps = self.warmup_epochs * steps_per_epoch
        self.decay_steps = train_steps - self.warmup_steps + 1
        if self.decay_steps <= 0:
            raise ValueError(f"Invalid train_steps: {train_steps}; the warm-up alone takes {self.warmup_steps} steps "
                             f"({self.warmup_epochs} epochs of {steps_per_epoch})")
        self.batch_size, self.steps_per_epoch, self.train_steps = batch_size, steps_per_epoch, train_steps
        self.name = name
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0 for the first)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.initial_learning_rate * step / self.warmup_steps
        progress = min(max(step - self.warmup_steps, 1), self.decay_steps) / self.decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * (1 - progress) ** 2 + self.end_learning_rate

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)
