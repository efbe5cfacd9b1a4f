"""larsopt.schedules against the MLPerf reference's formula (lars_util.py with Keras PolynomialDecay)."""

from __future__ import annotations

import pytest
import torch

import larsopt
from larsopt.schedules import PolynomialDecayWithWarmup


def _keras_reference(step, batch_size, steps_per_epoch, train_steps, initial=None, end=None, warmup_epochs=None):
    """``PolynomialDecayWithWarmup._get_learning_rate`` over ``tf.keras.optimizers.schedules.PolynomialDecay``."""
    if batch_size < 16384:
        default_lr, default_warmup = 10.0, 5
    elif batch_size < 32768:
        default_lr, default_warmup = 25.0, 5
    else:
        default_lr, default_warmup = 31.2, 25
    initial = initial or default_lr
    end = end or 0.0001
    warmup_steps = (default_warmup if warmup_epochs is None else warmup_epochs) * steps_per_epoch
    decay_steps = train_steps - warmup_steps + 1
    if step <= warmup_steps:
        return initial * step / warmup_steps
    poly_step = min(max(step - warmup_steps, 1), decay_steps)  # Keras clips the step at decay_steps
    return (initial - end) * (1 - poly_step / decay_steps) ** 2.0 + end


@pytest.mark.parametrize("batch_size,steps_per_epoch,train_steps,kwargs", [
    (4096, 312, 312 * 42, {}),
    (16384, 78, 78 * 44, {}),
    (32768, 39, 39 * 72, {}),
    (2048, 10, 200, dict(initial_learning_rate=8.5, end_learning_rate=0.001, warmup_epochs=2)),
    (1024, 7, 50, dict(initial_learning_rate=0.0, end_learning_rate=0.0)),  # 0 means "the default"
])
def test_schedule_matches_the_reference_formula(batch_size, steps_per_epoch, train_steps, kwargs):
    param = torch.zeros(2, requires_grad=True)
    optimizer = larsopt.LARS([{"params": [param]}, {"params": [torch.zeros(1, requires_grad=True)]}], lr=123.0)
    schedule = PolynomialDecayWithWarmup(optimizer, batch_size, steps_per_epoch, train_steps, **kwargs)
    names = dict(initial_learning_rate="initial", end_learning_rate="end")
    reference_kwargs = {names.get(k, k): v for k, v in kwargs.items()}
    for step in range(train_steps + 5):
        want = _keras_reference(step, batch_size, steps_per_epoch, train_steps, **reference_kwargs)
        assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(want, rel=1e-12, abs=1e-15)] * 2
        optimizer.step()
        schedule.step()


def test_tensor_lr_is_filled_in_place():
    lr = torch.tensor(0.5)
    optimizer = larsopt.LARS([torch.zeros(2, requires_grad=True)], lr=lr)
    schedule = PolynomialDecayWithWarmup(optimizer, 1024, 10, 100, warmup_epochs=1)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(10.0 * 3 / 10)


def test_bad_arguments():
    optimizer = larsopt.LARS([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        PolynomialDecayWithWarmup(optimizer, 1024, 0, 100)
    with pytest.raises(ValueError, match="train_steps"):
        PolynomialDecayWithWarmup(optimizer, 1024, 10, 20)  # 5 warm-up epochs = 50 steps
