"""lmx.LARS, lmx.Optimizer, the registry and lmx.Updater: MXNet 2.0's API and bookkeeping."""

import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx


def lr_and_wd_seen(opt, index, *, weight=2.0, grad=1.0):
    """The lr and wd the optimizer used for ``index``, read back from one plain SGD step.

    With momentum 0 and an excluded name (lam = 1): w' = w - lr * (g + wd * w). Two weights of
    different values give two equations.
    """
    weights = [torch.tensor([weight, 2 * weight], dtype=torch.float64)]
    opt.update([index], weights, [torch.tensor([grad, grad], dtype=torch.float64)], [None])
    (d1, d2) = (torch.tensor([weight, 2 * weight], dtype=torch.float64) - weights[0]).tolist()
    # d1 = lr * (g + wd * w), d2 = lr * (g + 2 * wd * w)  =>  lr * wd * w = d2 - d1
    lr = (d1 - (d2 - d1)) / grad
    wd = (d2 - d1) / (lr * weight)
    return lr, wd


def test_multiplier_priority_param_dict_then_index_then_name():
    names = {0: "a_bias", 1: "b_bias", 2: "c_bias"}
    opt = lmx.LARS(learning_rate=1.0, wd=0.1, param_idx2name=names,
                   param_dict={2: SimpleNamespace(lr_mult=0.7, wd_mult=0.2)})
    opt.set_lr_mult({0: 0.2, "a_bias": 0.5, "b_bias": 0.3, 2: 0.11, "c_bias": 0.13})
    opt.set_wd_mult({0: 3.0, "a_bias": 5.0, "b_bias": 4.0, 2: 6.0})
    assert lr_and_wd_seen(opt, 0) == pytest.approx((0.2, 0.3))    # index beats name
    assert lr_and_wd_seen(opt, 1) == pytest.approx((0.3, 0.4))    # name
    assert lr_and_wd_seen(opt, 2) == pytest.approx((0.7, 0.02))   # param_dict beats everything
    assert lr_and_wd_seen(opt, "3_bias") == pytest.approx((1.0, 0.1))  # nothing: 1


def test_set_mult_rebuilds_the_table_and_seeds_from_sym():
    class Symbol:
        def attr_dict(self):
            return {"w_bias": {"__lr_mult__": "0.25", "__wd_mult__": "2"}}

        def list_arguments(self):
            return ["w_bias", "other"]

    opt = lmx.LARS(learning_rate=1.0, wd=0.1, sym=Symbol(), param_idx2name={0: "w_bias"})
    assert opt.lr_mult == {"w_bias": 0.25} and opt.wd_mult == {"w_bias": 2.0}
    assert lr_and_wd_seen(opt, 0) == pytest.approx((0.25, 0.2))
    opt.set_lr_mult({1: 3.0})
    assert opt.lr_mult == {"w_bias": 0.25, 1: 3.0}


def test_name_suffix_exclusion_is_plain_endswith():
    opt = lmx.LARS(param_idx2name={0: "fc_bias", 1: "xbias", 2: "bn_gamma", 3: "omegamma", 4: "bn_beta",
                                   5: "fc_Bias", 6: "fc_weight"})
    assert [opt.uses_trust_ratio(i) for i in range(8)] == [False, False, False, False, False, True, True, True]
    assert not opt.uses_trust_ratio("some_bias")  # an index missing from idx2name is named str(index)


def test_excluded_name_keeps_weight_decay_and_skips_eta():
    opt = lmx.LARS(learning_rate=0.5, wd=0.1, eta=0.01, param_idx2name={0: "fc_bias", 1: "fc_weight"})
    w = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])]
    g = [torch.tensor([0.5, -0.5]), torch.tensor([0.5, -0.5])]
    opt.update([0, 1], w, g, [None, None])
    expected_bias = torch.tensor([1.0, 2.0]) - 0.5 * (g[0] + 0.1 * torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(w[0], expected_bias)
    w_norm, g_norm = 5 ** 0.5, 0.5 ** 0.5
    lam = 0.01 * w_norm / (g_norm + 0.1 * w_norm + 1e-8)
    torch.testing.assert_close(w[1], torch.tensor([1.0, 2.0]) - 0.5 * lam * (g[1] + 0.1 * torch.tensor([1.0, 2.0])))


@pytest.mark.parametrize("use_fused_step", [True, False])
def test_fallback_to_plain_lr_for_zero_weight_or_zero_grad(use_fused_step):
    opt = lmx.LARS(learning_rate=0.5, eta=0.01, wd=0.1, use_fused_step=use_fused_step)
    w = [torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])]
    g = [torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)]
    opt.update([0, 1], w, g, [None, None])
    torch.testing.assert_close(w[0], -0.5 * torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(w[1], torch.tensor([1.0, 2.0, 3.0]) * (1 - 0.5 * 0.1))


def test_clip_after_rescale_and_outside_the_norm():
    opt = lmx.LARS(learning_rate=1.0, eta=0.1, rescale_grad=2.0, clip_gradient=0.5)
    w = [torch.tensor([3.0, 4.0])]
    g = torch.tensor([1.0, 0.1])
    opt.update([0], w, [g], [None])
    lam = 0.1 * 5.0 / (2.0 * float(torch.linalg.vector_norm(g)) + 1e-8)
    torch.testing.assert_close(w[0], torch.tensor([3.0, 4.0]) - lam * torch.tensor([0.5, 0.2]))


@pytest.mark.parametrize("method", ["step", "fused_step", "update", "update_multi_precision"])
def test_every_update_method_takes_one_index_or_lists(method):
    results = []
    for single in (True, False):
        opt = lmx.LARS(momentum=0.9, wd=0.1)
        w, g = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5])
        state = opt.create_state(3, w)
        args = (3, w, g, state) if single else ([3], [w], [g], [state])
        getattr(opt, method)(*args)
        results.append((w, state, opt.num_update))
    torch.testing.assert_close(results[0][:2], results[1][:2])
    assert results[0][2] == results[1][2] == 1


def test_single_index_update_and_momentum_state():
    opt = lmx.LARS(momentum=0.9, param_idx2name={7: "b_bias"}, learning_rate=1.0)
    w = torch.tensor([1.0, 1.0])
    state = opt.create_state(7, w)
    for _ in range(2):
        opt.update(7, w, torch.tensor([1.0, -1.0]), state)
    torch.testing.assert_close(state, torch.tensor([-1.9, 1.9]))
    torch.testing.assert_close(w, torch.tensor([1.0 - 2.9, 1.0 + 2.9]))
    assert opt.num_update == 2


@pytest.mark.parametrize("use_fused_step", [True, False])
def test_caller_gradient_is_never_modified(use_fused_step):
    opt = lmx.LARS(use_fused_step=use_fused_step, rescale_grad=0.5, wd=0.1, momentum=0.9)
    w = [torch.rand(4, 3), torch.rand(5)]
    g = [torch.rand(4, 3), torch.rand(5)]
    g_copy = [x.clone() for x in g]
    states = [opt.create_state(i, x) for i, x in enumerate(w)]
    opt.update([0, 1], w, g, states)
    for a, b in zip(g, g_copy):
        assert torch.equal(a, b)


def test_numpy_arrays_are_updated_in_place():
    opt = lmx.LARS(momentum=0.9, wd=0.01)
    w = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    w_view = w
    state = opt.create_state(0, w)
    assert isinstance(state, np.ndarray) and state.dtype == np.float32
    g = np.array([[0.5, -0.5], [1.0, 2.0]], dtype=np.float32)
    g.flags.writeable = False  # read-only grads are fine
    opt.update([0], [w], [g], [state])
    assert w is w_view and not np.allclose(w, [[0.1, 0.2], [0.3, 0.4]])
    assert np.any(state != 0)
    np.testing.assert_array_equal(g, [[0.5, -0.5], [1.0, 2.0]])


@pytest.mark.parametrize("dtype,multi_precision", [(torch.float32, False), (torch.float16, True)])
def test_model_parameters_are_updated_in_place(dtype, multi_precision):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(dtype)
    model(torch.randn(4, 3, dtype=dtype)).sum().backward()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    updater = lmx.get_updater(lmx.LARS(momentum=0.9, multi_precision=multi_precision, eta=0.1))
    updater(list(range(len(params))), [p.grad for p in params], params)
    assert all(p.requires_grad and p.grad_fn is None for p in params)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_read_only_numpy_weight_is_an_error():
    w = np.ones(3, dtype=np.float32)
    w.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lmx.LARS().update([0], [w], [np.ones(3, dtype=np.float32)], [None])


# ------------------------------------------------------------------------------------ states


def test_create_state():
    assert lmx.LARS().create_state(0, torch.ones(2)) is None
    state = lmx.LARS(momentum=0.5).create_state(0, torch.ones(2, 3, dtype=torch.float64))
    assert state.dtype == torch.float64 and state.shape == (2, 3) and not state.any()


def test_create_state_multi_precision_returns_master_then_momentum():
    opt = lmx.LARS(momentum=0.9, multi_precision=True)
    w = torch.tensor([1.0, 2.0], dtype=torch.float16)
    master, mom = opt.create_state_multi_precision(0, w)
    assert master.dtype == torch.float32 and mom.dtype == torch.float32
    assert torch.equal(master, w.float()) and not mom.any()
    master[0] = 5  # a copy, not a view
    assert w[0] == 1
    assert opt.create_state_multi_precision(1, torch.ones(2)).dtype == torch.float32  # fp32: plain state
    no_momentum = lmx.LARS(multi_precision=True).create_state_multi_precision(0, w)
    assert isinstance(no_momentum, tuple) and no_momentum[1] is None


def test_float16_without_multi_precision_warns():
    with pytest.warns(UserWarning, match="Accumulating with float16"):
        lmx.LARS().create_state_multi_precision(0, torch.ones(2, dtype=torch.float16))


@pytest.mark.parametrize("use_fused_step", [True, False])
def test_float16_without_master_loses_tiny_updates_as_mxnet(use_fused_step):
    # Spec §5.5: effective lr 1e-8 underflows in float16; with multi_precision it does not.
    for multi_precision, expected in ((False, 1e-3), (True, 9.904e-4)):
        opt = lmx.LARS(learning_rate=0.1, eta=0.1, multi_precision=multi_precision, use_fused_step=use_fused_step)
        w = torch.tensor([1e-3], dtype=torch.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = opt.create_state_multi_precision(0, w)
        opt.update_multi_precision([0], [w], [torch.tensor([1000.0], dtype=torch.float16)], [state])
        assert w.item() == pytest.approx(expected, rel=1e-3), multi_precision


def test_multi_precision_state_must_be_the_pair():
    opt = lmx.LARS(momentum=0.9, multi_precision=True)
    w = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="create_state_multi_precision"):
        opt.update([0], [w], [torch.ones(2, dtype=torch.float16)], [torch.zeros(2)])


# ------------------------------------------------------------------------------------ updater


class RecordingLARS(lmx.LARS):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def update_multi_precision(self, indices, weights, grads, states):
        self.calls.append(list(indices))
        super().update_multi_precision(indices, weights, grads, states)


def mixed_dtype_inputs():
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32, torch.float64, torch.float32]
    weights = [torch.rand(3, dtype=d) for d in dtypes]
    grads = [torch.rand(3, dtype=d) for d in dtypes]
    return list(range(len(dtypes))), grads, weights


@pytest.mark.parametrize("aggregate_num,expected", [
    (0, [[0], [1], [2], [3], [4], [5]]),
    (1, [[0], [1], [2], [3], [4], [5]]),
    (2, [[0, 2], [3, 5], [1, 4]]),
    (3, [[0, 2, 3], [5], [1, 4]]),
    (np.inf, [[0, 1, 2, 3, 4, 5]]),
    (float("inf"), [[0, 1, 2, 3, 4, 5]]),
])
def test_updater_groups_by_dtype_in_chunks(aggregate_num, expected):
    opt = RecordingLARS(aggregate_num=aggregate_num)
    updater = lmx.get_updater(opt)
    indices, grads, weights = mixed_dtype_inputs()
    updater(indices, grads, weights)
    assert opt.calls == expected


def test_updater_creates_states_lazily_and_takes_single_arrays():
    opt = lmx.LARS(momentum=0.9)
    updater = lmx.Updater(opt)
    w = [torch.rand(3), torch.rand(2)]
    updater(0, torch.rand(3), w[0])
    assert list(updater.states) == [0]
    updater([0, 1], [torch.rand(3), torch.rand(2)], w)
    assert list(updater.states) == [0, 1]
    assert opt._index_update_count == {0: 2, 1: 1}


def run_updater(updater, weights, grads_per_step):
    for grads in grads_per_step:
        updater(list(range(len(weights))), grads, weights)


@pytest.mark.parametrize("dump_optimizer", [False, True])
def test_get_states_set_states_round_trip(dump_optimizer):
    torch.manual_seed(0)
    kwargs = dict(momentum=0.9, wd=1e-3, learning_rate=None, multi_precision=True,
                  lr_scheduler=lmx.lr_scheduler.FactorScheduler(step=1, factor=0.9, base_lr=0.5))
    weights0 = [torch.rand(4, 3, dtype=torch.float16), torch.rand(5)]
    grads = [[torch.rand(4, 3, dtype=torch.float16), torch.rand(5)] for _ in range(4)]

    straight = [w.clone() for w in weights0]
    run_updater(lmx.get_updater(lmx.LARS(**kwargs)), straight, grads)

    kwargs["lr_scheduler"] = lmx.lr_scheduler.FactorScheduler(step=1, factor=0.9, base_lr=0.5)
    first = lmx.get_updater(lmx.LARS(**kwargs))
    resumed = [w.clone() for w in weights0]
    run_updater(first, resumed, grads[:2])
    blob = first.get_states(dump_optimizer=dump_optimizer)
    kwargs["lr_scheduler"] = lmx.lr_scheduler.FactorScheduler(step=1, factor=0.9, base_lr=0.5)
    second_optimizer = lmx.LARS(**kwargs)
    if not dump_optimizer:
        second_optimizer.num_update = 2  # without the optimizer, the counts are the caller's business
        second_optimizer._index_update_count.update({0: 2, 1: 2})
    second = lmx.get_updater(second_optimizer)
    second.set_states(blob)
    assert all(not synced for synced in second.states_synced.values())
    run_updater(second, resumed, grads[2:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_pickled_optimizer_drops_param_dict():
    opt = lmx.LARS(param_dict={0: SimpleNamespace(lr_mult=2.0, wd_mult=1.0)}, momentum=0.5)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.param_dict == {} and restored.momentum == 0.5


# ------------------------------------------------------------------------------------ construction


def test_defaults_and_attributes():
    opt = lmx.LARS()
    assert (opt.lr, opt.momentum, opt.eta, opt.epsilon) == (0.1, 0.0, 0.001, 1e-8)
    assert (opt.lazy_update, opt.use_fused_step, opt.aggregate_num) == (False, True, 1)
    assert (opt.wd, opt.rescale_grad, opt.clip_gradient, opt.multi_precision) == (0.0, 1.0, None, False)
    assert (opt.idx2name, opt.param_dict, opt.begin_num_update, opt.num_update) == ({}, {}, 0, 0)
    assert opt.lr_scheduler is None and opt.learning_rate == 0.1
    none_given = lmx.LARS(use_fused_step=None, aggregate_num=None)
    assert none_given.use_fused_step is False and none_given.aggregate_num == 1


def test_param_idx2name_is_copied():
    names = {0: "fc_bias"}
    opt = lmx.LARS(param_idx2name=names)
    names[1] = "other"
    assert opt.idx2name == {0: "fc_bias"}


def test_registry():
    assert type(lmx.create("LARS", momentum=0.9)) is lmx.LARS
    assert lmx.Optimizer.create_optimizer("lars").momentum == 0.0
    with pytest.raises(ValueError, match="Cannot find optimizer nosuch"):
        lmx.create("nosuch")

    class MyOptimizerForTheRegistryTest(lmx.Optimizer):
        pass

    try:
        assert lmx.register(MyOptimizerForTheRegistryTest) is MyOptimizerForTheRegistryTest
        assert isinstance(lmx.create("myoptimizerfortheregistrytest"), MyOptimizerForTheRegistryTest)
        with pytest.warns(UserWarning, match="is overriding"):
            lmx.register(MyOptimizerForTheRegistryTest)
    finally:
        del lmx.Optimizer.opt_registry["myoptimizerfortheregistrytest"]


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,message", [
    ({"use_fused_step": False, "lazy_update": True},
     "When use_fused_step is set to False, lazy_update has to be turned off."),
    ({"lazy_update": True, "multi_precision": True},
     "When lazy_update is set to True, multi_precision has be turned off."),
    ({"param_idx2name": [("a", 1)]}, "param_idx2name should be a dict of param indexes to names."),
])
def test_mxnet_asserts_keep_their_messages(kwargs, message):
    for error in (AssertionError, ValueError):
        with pytest.raises(error) as info:
            lmx.LARS(**kwargs)
        assert str(info.value) == message


def test_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'weight_decay'"):
        lmx.LARS(weight_decay=0.1)


@pytest.mark.parametrize("name,points_to", [
    ("eps", "`epsilon`"), ("lars_eta", "`eta`"), ("lars_epsilon", "`epsilon`"),
    ("momentum_correction", "MXNet 1.x behaviour"),
])
def test_mxnet_1x_names_point_to_2_0(name, points_to):
    with pytest.raises(TypeError) as info:
        lmx.create("lars", **{name: 0.1})
    assert repr(name) in str(info.value) and points_to in str(info.value) and "1.x" in str(info.value)


def test_bad_update_inputs():
    opt = lmx.LARS()
    with pytest.raises(ValueError, match="same length"):
        opt.update([0, 1], [torch.ones(2)], [torch.ones(2)], [None])
    with pytest.raises(ValueError, match="shape"):
        opt.update([0], [torch.ones(2)], [torch.ones(3)], [None])
    with pytest.raises(TypeError, match="torch.Tensor or a numpy.ndarray"):
        opt.update([0], [[1.0, 2.0]], [torch.ones(2)], [None])
    with pytest.raises(ValueError, match="same length"):
        lmx.Updater(opt)([0, 1], [torch.ones(2)], [torch.ones(2)])
