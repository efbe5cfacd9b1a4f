"""lmx in the corners users reach: integer weights, tensor indices, states of the wrong shape,
single arrays for a list of indices, NumPy scalars and wrong types for the hyper-parameters."""

import re

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx
from larsopt.mxnet import lr_scheduler as sched

PATHS = {"step": {"use_fused_step": False}, "fused": {}, "aggregated": {"aggregate_num": 4}}


def _snapshot(opt, updater=None):
    counts = {device: dict(counts) for device, counts in opt._all_index_update_counts.items()}
    return opt.num_update, counts, None if updater is None else dict(updater.states)


# ------------------------------------------------------------------------------------ integer arrays


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_weights_are_refused_before_anything_changes(path, dtype):
    opt = lmx.LARS(momentum=0.9, learning_rate=0.5, **PATHS[path])
    updater = lmx.get_updater(opt)
    fine = torch.ones(3)
    integer = torch.tensor([3, 4, 5]).to(dtype)
    with pytest.raises(TypeError, match=rf"weight of index 1 has dtype {dtype}; LARS updates floating-point"):
        updater([0, 1], [torch.ones(3), torch.ones(3)], [fine, integer])
    assert torch.equal(integer, torch.tensor([3, 4, 5]).to(dtype)) and torch.equal(fine, torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        opt.update([0, 1], [fine, integer], [torch.ones(3), torch.ones(3)], [None, None])
    assert torch.equal(fine, torch.ones(3)) and opt.num_update == 0


def test_integer_numpy_weight_and_state_creation_are_refused():
    opt = lmx.LARS(momentum=0.9)
    w = np.array([1, 2, 3], dtype=np.int64)
    for create in (opt.create_state, opt.create_state_multi_precision):
        with pytest.raises(TypeError, match="weight of index 0 has dtype torch.int64"):
            create(0, w)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        opt.update(0, w, np.ones(3, dtype=np.float32), np.zeros(3, dtype=np.float32))
    np.testing.assert_array_equal(w, [1, 2, 3])


def test_integer_grad_and_state_are_refused():
    opt = lmx.LARS(momentum=0.9)
    w = torch.ones(3)
    with pytest.raises(TypeError, match="grad of index 0 has dtype torch.int64"):
        opt.update(0, w, torch.ones(3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(TypeError, match="state of index 0 has dtype torch.int32"):
        opt.update(0, w, torch.ones(3), torch.zeros(3, dtype=torch.int32))
    assert torch.equal(w, torch.ones(3))


# ------------------------------------------------------------------------------------ indices


@pytest.mark.parametrize("make_index", [
    lambda: torch.tensor(0), lambda: torch.tensor(0, dtype=torch.int32), lambda: np.int64(0),
    lambda: np.array(0), lambda: np.int32(0),
])
def test_a_tensor_or_numpy_index_counts_by_its_value(make_index):
    opt = lmx.LARS(momentum=0.9, learning_rate=0.5)
    updater = lmx.get_updater(opt)
    w = torch.ones(3)
    for _ in range(3):
        updater(make_index(), torch.ones(3), w)
    updater([make_index()], [torch.ones(3)], [w])
    assert list(updater.states) == [0] and type(next(iter(updater.states))) is int
    assert opt._index_update_count == {0: 4} and opt.num_update == 4

    reference = lmx.LARS(momentum=0.9, learning_rate=0.5)
    reference_updater = lmx.get_updater(reference)
    w_reference = torch.ones(3)
    for _ in range(4):
        reference_updater(0, torch.ones(3), w_reference)
    assert torch.equal(w, w_reference)


def test_a_tensor_index_in_update_counts_by_its_value():
    opt = lmx.LARS(param_idx2name={1: "fc_bias"})
    for _ in range(2):
        opt.update(torch.tensor(1), torch.ones(2), torch.ones(2), None)
        opt.update([torch.tensor(1)], [torch.ones(2)], [torch.ones(2)], [None])
    assert opt._index_update_count == {1: 4}
    assert not opt.uses_trust_ratio(1)


@pytest.mark.parametrize("index", [torch.tensor(0.0), torch.tensor([0, 1]), torch.tensor(True), np.array([0]),
                                   1.0, True, None, (0,)])
def test_an_index_of_the_wrong_type_is_a_type_error(index):
    updater = lmx.get_updater(lmx.LARS())
    w = torch.ones(2)
    with pytest.raises(TypeError, match="index must be an int"):
        updater([index], [torch.ones(2)], [w])
    assert updater.states == {} and torch.equal(w, torch.ones(2))


def test_bytes_and_str_indices_are_names():
    updater = lmx.get_updater(lmx.LARS(momentum=0.9))
    updater([b"fc_bias", "fc_weight"], [torch.ones(2), torch.ones(2)], [torch.ones(2), torch.ones(2)])
    assert list(updater.states) == ["fc_bias", "fc_weight"]


# ------------------------------------------------------------------------------------ state shapes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("state_shape", [(3, 2), (6,), (2, 3, 1), (1, 3)])
def test_a_state_of_another_shape_is_refused(path, state_shape):
    opt = lmx.LARS(momentum=0.9, **PATHS[path])
    w = torch.ones(2, 3)
    state = torch.zeros(state_shape)
    with pytest.raises(ValueError, match=re.escape(f"state of index 5 has shape {state_shape}, its weight (2, 3)")):
        opt.update([5], [w], [torch.ones(2, 3)], [state])
    assert torch.equal(w, torch.ones(2, 3)) and not state.any() and opt.num_update == 0


def test_a_restored_state_of_another_shape_is_refused_by_the_updater():
    first = lmx.get_updater(lmx.LARS(momentum=0.9))
    first([0], [torch.ones(2, 3)], [torch.ones(2, 3)])
    second = lmx.get_updater(lmx.LARS(momentum=0.9))
    second.set_states(first.get_states())
    w = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"state of index 0 has shape \(2, 3\), its weight \(3, 2\)"):
        second([0], [torch.ones(3, 2)], [w])
    assert torch.equal(w, torch.ones(3, 2))


def test_multi_precision_master_and_momentum_of_another_shape_are_refused():
    opt = lmx.LARS(momentum=0.9, multi_precision=True)
    w = torch.ones(2, 3, dtype=torch.float16)
    g = torch.ones(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"master weight of index 0 has shape \(6,\), its weight \(2, 3\)"):
        opt.update_multi_precision([0], [w], [g], [(torch.ones(6), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"state of index 0 has shape \(3, 2\), its weight \(2, 3\)"):
        opt.update_multi_precision([0], [w], [g], [(torch.ones(2, 3), torch.zeros(3, 2))])
    assert torch.equal(w, torch.ones(2, 3, dtype=torch.float16))


def test_a_numpy_state_of_another_shape_is_refused():
    opt = lmx.LARS(momentum=0.9)
    with pytest.raises(ValueError, match=r"state of index 0 has shape \(4,\), its weight \(2, 2\)"):
        opt.update(0, np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.zeros(4, np.float32))


# ------------------------------------------------------------------------------------ single arrays for a list


@pytest.mark.parametrize("make", [lambda: torch.ones(2, 3), lambda: np.ones((2, 3), np.float32)])
def test_single_arrays_for_a_list_of_indices_are_refused(make):
    updater = lmx.get_updater(lmx.LARS(momentum=0.9))
    weight = make()
    with pytest.raises(TypeError, match=r"the index is a list of 2, so grads must be a list \(or tuple\) of as many, "
                                        r"got a \w+ of shape \(2, 3\)"):
        updater([0, 1], make(), weight)
    with pytest.raises(TypeError, match="so weights must be a list"):
        updater([0, 1], [make(), make()], weight)
    assert updater.states == {} and (weight == 1).all()


def test_single_arrays_for_a_list_of_indices_in_update_are_refused():
    opt = lmx.LARS(momentum=0.9)
    w = torch.ones(2, 3)
    with pytest.raises(TypeError, match="so weights must be a list"):
        opt.update([0, 1], w, [torch.ones(3), torch.ones(3)], [None, None])
    with pytest.raises(TypeError, match="so states must be a list"):
        opt.update([0, 1], [w[0], w[1]], [torch.ones(3), torch.ones(3)], torch.zeros(2, 3))
    assert torch.equal(w, torch.ones(2, 3)) and opt.num_update == 0


def test_tuples_are_lists():
    updater = lmx.get_updater(lmx.LARS(momentum=0.9))
    w = (torch.ones(2), torch.ones(3))
    updater((0, 1), (torch.ones(2), torch.ones(3)), w)
    assert list(updater.states) == [0, 1] and not torch.equal(w[0], torch.ones(2))


# ------------------------------------------------------------------------------------ hyper-parameters


def _train(**kwargs):
    opt = lmx.LARS(**kwargs)
    updater = lmx.get_updater(opt)
    weights = [torch.linspace(-1, 1, 6).reshape(2, 3), torch.linspace(0.5, 1, 3)]
    for step in range(3):
        grads = [torch.full((2, 3), 0.3 - 0.1 * step), torch.full((3,), 0.2)]
        updater([0, 1], grads, weights)
    return weights


NUMPY_KWARGS = {
    "learning_rate": np.float32(0.5), "momentum": np.float64(0.9), "wd": np.float32(1e-3), "eta": np.float64(0.1),
    "epsilon": np.float32(1e-8), "rescale_grad": np.int64(2), "clip_gradient": np.float64(0.25),
    "begin_num_update": np.int64(3), "aggregate_num": np.int64(4), "multi_precision": np.bool_(False),
    "lazy_update": np.bool_(False),
}


@pytest.mark.parametrize("name", NUMPY_KWARGS)
def test_numpy_scalars_are_real_numbers(name):
    python_value = NUMPY_KWARGS[name].item()
    base = {"learning_rate": 0.5, "momentum": 0.9, "wd": 1e-3, "eta": 0.1, "rescale_grad": 2.0}
    expected = _train(**{**base, name: python_value})
    got = _train(**{**base, name: NUMPY_KWARGS[name]})
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # a float32 scalar is its float32 value


@pytest.mark.parametrize("name", ["learning_rate", "momentum", "wd", "eta", "epsilon", "rescale_grad",
                                  "clip_gradient"])
@pytest.mark.parametrize("value", ["0.1", [0.1], True, torch.tensor(0.1), 1j])
def test_a_hyper_parameter_of_the_wrong_type_is_a_type_error(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be .*real number, got .* of type {type(value).__name__}"):
        lmx.LARS(**{name: value})


@pytest.mark.parametrize("name", ["learning_rate", "momentum", "wd", "eta", "epsilon", "rescale_grad",
                                  "clip_gradient"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf, np.float32("nan")])
def test_a_non_finite_hyper_parameter_is_a_value_error(name, value):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite real number, got {value!r}")):
        lmx.LARS(**{name: value})


@pytest.mark.parametrize("kwargs,error,match", [
    ({"begin_num_update": 1.0}, TypeError, "begin_num_update must be an int"),
    ({"begin_num_update": -1}, ValueError, "begin_num_update must be an int >= 0, got -1"),
    ({"aggregate_num": 2.0}, TypeError, "aggregate_num"),
    ({"aggregate_num": -np.inf}, TypeError, "aggregate_num"),
    ({"aggregate_num": -1}, ValueError, "aggregate_num"),
    ({"multi_precision": 1}, TypeError, "multi_precision must be True or False"),
    ({"lazy_update": "yes"}, TypeError, "lazy_update must be True or False"),
    ({"use_fused_step": 0}, TypeError, "use_fused_step must be None, True or False"),
    ({"lr_scheduler": 0.1}, TypeError, "lr_scheduler must be None or a callable"),
])
def test_other_arguments_of_the_wrong_type_or_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        lmx.LARS(**kwargs)


def test_setters_check_their_values():
    opt = lmx.LARS()
    opt.set_learning_rate(np.float32(0.25))
    with pytest.raises(TypeError, match="learning_rate"):
        opt.set_learning_rate("0.1")
    with pytest.raises(ValueError, match="learning_rate"):
        opt.set_learning_rate(float("nan"))
    opt.set_lr_mult({0: np.float32(0.5), "fc_bias": np.int64(2)})
    with pytest.raises(TypeError, match=r"the multiplier of 0 in set_wd_mult must be a finite real number"):
        opt.set_wd_mult({0: "0"})
    with pytest.raises(TypeError, match="set_lr_mult takes a dict"):
        opt.set_lr_mult([(0, 0.5)])
    assert opt.lr_mult == {0: np.float32(0.5), "fc_bias": np.int64(2)}


def test_scheduler_arguments_take_numpy_scalars():
    numpy_made = sched.PolyScheduler(max_update=np.int64(10), base_lr=np.float32(1.0), pwr=np.int64(2),
                                     final_lr=np.float64(0.1), warmup_steps=np.int64(2),
                                     warmup_begin_lr=np.float32(0.0))
    python_made = sched.PolyScheduler(max_update=10, base_lr=1.0, pwr=2, final_lr=0.1, warmup_steps=2)
    assert [numpy_made(n) for n in range(12)] == pytest.approx([python_made(n) for n in range(12)])
    factor = sched.FactorScheduler(step=np.int64(2), factor=np.float32(0.5), base_lr=1.0)
    assert [factor(n) for n in range(1, 6)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    multi = sched.MultiFactorScheduler(step=[np.int64(2), np.int64(4)], factor=0.5, base_lr=1.0)
    assert [multi(n) for n in range(1, 6)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("make,error", [
    (lambda: sched.PolyScheduler(max_update=10.0), lmx.MXNetAssertionTypeError),
    (lambda: sched.FactorScheduler(step="2"), TypeError),
    (lambda: sched.FactorScheduler(step=1, factor="0.5"), TypeError),
    (lambda: sched.CosineScheduler(max_update=10, base_lr="0.1"), TypeError),
    (lambda: sched.CosineScheduler(max_update=10, base_lr=float("nan")), ValueError),
    (lambda: sched.MultiFactorScheduler(step=(2, 3)), lmx.MXNetAssertionTypeError),
    (lambda: sched.MultiFactorScheduler(step=[2, "3"]), TypeError),
    (lambda: sched.CosineScheduler(max_update=10, warmup_mode=1), TypeError),
])
def test_scheduler_arguments_of_the_wrong_type(make, error):
    with pytest.raises(error):
        make()


def test_mxnet_type_asserts_are_type_errors_and_assertion_errors():
    for caught in (TypeError, AssertionError, ValueError, lmx.MXNetAssertionError):
        with pytest.raises(caught, match="max_update must be an int, got 10.0 of type float"):
            sched.PolyScheduler(max_update=10.0)
