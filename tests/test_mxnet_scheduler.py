"""lmx.lr_scheduler: MXNet 2.0's schedulers' numbers, and how the optimizer drives them."""

import math
import warnings

import pytest
import torch

from larsopt import mxnet as lmx
from larsopt.mxnet import lr_scheduler as sched


def lrs(scheduler, updates):
    return [scheduler(n) for n in updates]


def test_factor_scheduler_decays_every_step_updates():
    s = sched.FactorScheduler(step=2, factor=0.5, base_lr=1.0)
    assert lrs(s, range(1, 8)) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_factor_scheduler_stops_at_stop_factor_lr():
    s = sched.FactorScheduler(step=1, factor=0.1, stop_factor_lr=1e-3, base_lr=1.0)
    assert lrs(s, range(1, 7)) == pytest.approx([1.0, 0.1, 0.01, 1e-3, 1e-3, 1e-3])


def test_factor_scheduler_catches_up_after_a_jump():
    s = sched.FactorScheduler(step=1, factor=0.5, base_lr=1.0)
    assert s(5) == 0.0625


def test_linear_warmup_then_factor():
    s = sched.FactorScheduler(step=2, factor=0.5, base_lr=1.0, warmup_steps=3, warmup_begin_lr=0.1)
    # warm-up: 0.1 + 0.9 * n / 3 for n < 3; then the factor schedule counts from 0, so n=3 > 2 decays once.
    assert lrs(s, range(0, 6)) == pytest.approx([0.1, 0.4, 0.7, 0.5, 0.5, 0.25])


def test_constant_warmup():
    s = sched.MultiFactorScheduler(step=[4], factor=0.5, base_lr=1.0, warmup_steps=3, warmup_begin_lr=0.2,
                                   warmup_mode="constant")
    assert lrs(s, range(0, 7)) == pytest.approx([0.2, 0.2, 0.2, 1.0, 1.0, 0.5, 0.5])


def test_multifactor_scheduler():
    s = sched.MultiFactorScheduler(step=[2, 4], factor=0.1, base_lr=1.0)
    assert lrs(s, range(1, 7)) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_poly_scheduler_with_warmup_and_final_lr():
    s = sched.PolyScheduler(max_update=10, base_lr=1.0, pwr=2, final_lr=0.1, warmup_steps=2)
    got = lrs(s, [0, 1, 2, 6, 10, 12])
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.1 + 0.9 * 0.25, 0.1, 0.1])


def test_poly_scheduler_default_power_is_two():
    s = sched.PolyScheduler(max_update=4, base_lr=2.0)
    assert lrs(s, [1, 2, 3, 4]) == pytest.approx([2.0 * 0.75 ** 2, 2.0 * 0.25, 2.0 * 0.0625, 0.0])


def test_cosine_scheduler():
    s = sched.CosineScheduler(max_update=10, base_lr=1.0, final_lr=0.0)
    assert lrs(s, [0, 5, 10, 11]) == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_cosine_scheduler_with_warmup():
    s = sched.CosineScheduler(max_update=12, base_lr=0.8, final_lr=0.2, warmup_steps=4, warmup_begin_lr=0.0)
    expected_mid = 0.2 + 0.6 * (1 + math.cos(math.pi * 4 / 8)) / 2
    assert lrs(s, [2, 4, 8, 12]) == pytest.approx([0.4, 0.8, expected_mid, 0.2])


@pytest.mark.parametrize("make", [
    lambda: sched.FactorScheduler(step=0),
    lambda: sched.FactorScheduler(step=1, factor=1.5),
    lambda: sched.MultiFactorScheduler(step=[3, 2]),
    lambda: sched.MultiFactorScheduler(step=[0, 2]),
    lambda: sched.PolyScheduler(max_update=0),
    lambda: sched.CosineScheduler(max_update=10, base_lr=0.1, warmup_begin_lr=0.5),
    lambda: sched.CosineScheduler(max_update=10, warmup_steps=-1),
    lambda: sched.CosineScheduler(max_update=10, warmup_mode="cubic"),
])
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make", [
    lambda: sched.PolyScheduler(max_update=10.0),
    lambda: sched.FactorScheduler(step=1, warmup_steps=2.5),
    lambda: sched.MultiFactorScheduler(step=(2, 3)),
])
def test_mxnet_asserts_raise_the_compatible_error(make):
    with pytest.raises(lmx.MXNetAssertionError):
        make()


# ------------------------------------------------------------------ the optimizer and its scheduler


def test_default_learning_rate_overwrites_the_scheduler_base_lr_with_a_warning():
    s = sched.FactorScheduler(step=1, factor=0.5, base_lr=1.0)
    with pytest.warns(UserWarning, match="overwritten by ``learning_rate``"):
        opt = lmx.LARS(lr_scheduler=s)
    assert s.base_lr == 0.1
    assert opt.learning_rate == 0.1


def test_learning_rate_none_keeps_the_scheduler_base_lr():
    s = sched.FactorScheduler(step=1, factor=0.5, base_lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = lmx.LARS(learning_rate=None, lr_scheduler=s)
    assert s.base_lr == 1.0 and opt.lr is None


def test_learning_rate_none_without_scheduler_is_0_01():
    assert lmx.LARS(learning_rate=None).learning_rate == 0.01


def test_overwrite_does_not_reach_poly_decay_after_warmup():
    # MXNet's PolyScheduler decays from base_lr_orig, which the optimizer does not touch.
    s = sched.PolyScheduler(max_update=10, base_lr=1.0, pwr=1)
    with pytest.warns(UserWarning):
        lmx.LARS(learning_rate=0.5, lr_scheduler=s)
    assert s(5) == pytest.approx(0.5)  # 1.0 * (1 - 5/10), not 0.5 * ...
    assert s(1) == pytest.approx(0.9)


def test_set_learning_rate_with_a_scheduler_raises_user_warning():
    opt = lmx.LARS(learning_rate=None, lr_scheduler=sched.FactorScheduler(step=1))
    with pytest.raises(UserWarning):
        opt.set_learning_rate(0.5)
    plain = lmx.LARS()
    plain.set_learning_rate(0.5)
    assert plain.learning_rate == 0.5


class RecordingScheduler:
    """Any callable num_update -> lr is a scheduler; this one records its calls."""

    def __init__(self):
        self.base_lr = None
        self.calls = []

    def __call__(self, num_update):
        self.calls.append(num_update)
        return 0.1


def excluded_update_inputs(count):
    weights = [torch.ones(3) for _ in range(count)]
    grads = [torch.ones(3) for _ in range(count)]
    return weights, grads, [None] * count


@pytest.mark.parametrize("use_fused_step,expected_calls", [(True, [6]), (False, [6, 6])])
def test_scheduler_sees_num_update_from_begin_num_update(use_fused_step, expected_calls):
    recorder = RecordingScheduler()
    opt = lmx.LARS(learning_rate=None, lr_scheduler=recorder, begin_num_update=5, use_fused_step=use_fused_step)
    weights, grads, states = excluded_update_inputs(2)
    opt.update([0, 1], weights, grads, states)
    assert recorder.calls == expected_calls
    assert opt.num_update == 6


def test_step_path_counts_each_weight_before_its_lr():
    # Index 1 is one update ahead: on the step path the scheduler sees 1 then 2 within one call;
    # the fused path counts both first and calls it once with 2.
    for use_fused_step, expected in ((False, [1, 2]), (True, [2])):
        recorder = RecordingScheduler()
        opt = lmx.LARS(learning_rate=None, lr_scheduler=recorder, use_fused_step=use_fused_step)
        opt._update_count(1)
        weights, grads, states = excluded_update_inputs(2)
        opt.update([0, 1], weights, grads, states)
        assert recorder.calls == expected, use_fused_step


def test_num_update_is_the_largest_count_and_shared_by_devices():
    opt = lmx.LARS()
    opt._update_count([0, 1])
    opt._update_count(0)
    assert opt.num_update == 2
    opt._set_current_device(1)
    opt._update_count(0)
    assert opt.num_update == 2  # device 1 counts index 0 once; num_update stays the max
    assert opt._all_index_update_counts == {0: {0: 2, 1: 1}, 1: {0: 1}}
