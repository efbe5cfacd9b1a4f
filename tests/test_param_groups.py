"""larsopt.param_groups: presets, regex, callable, torch's bias names, custom norm types, where
weight decay comes from, frozen params, bad input, and the groups used end to end in larsopt.LARS."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import larsopt
from larsopt.grouping import BIAS_NAME

# Tiny tensors: one thread is faster and keeps the run time independent of machine load.
pytestmark = pytest.mark.usefixtures("single_thread")


def _placement(groups):
    """name -> (trust ratio on, weight decay) for every param in the groups (``None``: no
    ``weight_decay`` key, the optimizer's value)."""
    out = {}
    for group in groups:
        assert set(group) >= {"params", "param_names", "lars"}
        assert len(group["params"]) == len(group["param_names"]) > 0
        for name in group["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (group["lars"], group.get("weight_decay"))
    return out


def _named(*specs):
    """(name, shape) -> (name, tensor) pairs."""
    return [(name, torch.zeros(shape, requires_grad=True)) for name, shape in specs]


# --------------------------------------------------------------------------------------------
# "mxnet": plain suffix test on gamma / beta / bias, no trust ratio, weight decay kept
# --------------------------------------------------------------------------------------------


def test_mxnet_preset_suffix_rule():
    named = _named(
        ("conv0_weight", (3, 2, 3, 3)),
        ("bn0_gamma", (3,)),
        ("bn0_beta", (3,)),
        ("fc_bias", (5,)),
        ("xbias", (5,)),  # MXNet quirk: no separator needed (spec section 3.4)
        ("omegamma", (2,)),  # same quirk for gamma
        ("bias_scale", (4,)),  # "bias" not at the end: not excluded
        ("fc_Bias", (5,)),  # case-sensitive
        ("fc_weight", (5, 4)),
        ("running_mean", (3,)),  # 1-D but not a suffix match: MXNet applies LARS to it
    )
    placement = _placement(larsopt.param_groups(named, weight_decay=1e-4, exclude="mxnet"))
    excluded = {"bn0_gamma", "bn0_beta", "fc_bias", "xbias", "omegamma"}
    for name, _ in named:
        # mxnet keeps weight decay on every param, excluded or not.
        assert placement[name] == (name not in excluded, 1e-4), name


def test_mxnet_preset_on_a_torch_module_uses_torch_names():
    # Torch names BN scale/shift "weight"/"bias": only the "bias" suffix matches.
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    placement = _placement(larsopt.param_groups(model, weight_decay=0.1, exclude="mxnet"))
    assert placement == {"0.weight": (True, 0.1), "0.bias": (False, 0.1), "1.weight": (True, 0.1),
                         "1.bias": (False, 0.1)}


# --------------------------------------------------------------------------------------------
# "ndim": ndim <= 1, no trust ratio and no weight decay
# --------------------------------------------------------------------------------------------


def test_ndim_preset():
    named = _named(("scalar", ()), ("vector", (7,)), ("matrix", (3, 4)), ("kernel", (2, 2, 3, 3)), ("row", (1, 5)))
    placement = _placement(larsopt.param_groups(named, weight_decay=5e-4, exclude="ndim"))
    assert placement == {"scalar": (False, 0.0), "vector": (False, 0.0), "matrix": (True, 5e-4),
                         "kernel": (True, 5e-4), "row": (True, 5e-4)}


def test_ndim_is_the_default_rule():
    named = _named(("w", (3, 3)), ("b", (3,)))
    assert _placement(larsopt.param_groups(named, weight_decay=1e-3)) == {"w": (True, 1e-3), "b": (False, 0.0)}


# --------------------------------------------------------------------------------------------
# "norm_and_bias": by module type, not by name
# --------------------------------------------------------------------------------------------


class _Scale(nn.Module):
    """A custom module with a param named "gamma" and one named "bias": not a norm layer."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(4))
        self.bias = nn.Parameter(torch.zeros(4))


class _MyLayerNorm(nn.LayerNorm):
    pass


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, bias=False)
        self.scale_and_shift = nn.BatchNorm2d(4)  # renamed: nothing in the name says "norm"
        self.mixer = nn.GroupNorm(2, 4)
        self.bn_proj = nn.Linear(4, 4)  # "bn" in the name but a Linear: only its bias is excluded
        self.ln = nn.LayerNorm(4)
        self.custom_ln = _MyLayerNorm(4)  # a subclass of a norm layer is a norm layer
        self.extra = _Scale()
        self.head = nn.Linear(4, 2)
        self.in_norm = nn.InstanceNorm2d(4, affine=True)


def test_norm_and_bias_preset_by_module_type():
    model = _Net()
    placement = _placement(larsopt.param_groups(model, weight_decay=1e-4, exclude="norm_and_bias"))
    excluded = {
        "scale_and_shift.weight", "scale_and_shift.bias",
        "mixer.weight", "mixer.bias",
        "bn_proj.bias",
        "ln.weight", "ln.bias",
        "custom_ln.weight", "custom_ln.bias",
        "extra.bias",
        "head.bias",
        "in_norm.weight", "in_norm.bias",
    }
    kept = {"stem.weight", "bn_proj.weight", "extra.gamma", "head.weight"}
    assert set(placement) == excluded | kept
    for name in excluded:
        assert placement[name] == (False, 0.0), name  # no trust ratio, no weight decay
    for name in kept:
        assert placement[name] == (True, 1e-4), name


def test_norm_and_bias_needs_a_module():
    with pytest.raises(ValueError, match="exclude") as info:
        larsopt.param_groups(list(_Net().named_parameters()), exclude="norm_and_bias")
    assert "norm_and_bias" in str(info.value)


# --------------------------------------------------------------------------------------------
# regex, callable, None, exclude_weight_decay
# --------------------------------------------------------------------------------------------


def test_compiled_regex_is_searched_in_the_name():
    model = _Net()
    placement = _placement(larsopt.param_groups(model, weight_decay=0.01, exclude=re.compile(r"\.bias$|^ln\.")))
    for name, _ in model.named_parameters():
        hit = name.endswith(".bias") or name.startswith("ln.")
        # Same rule for weight decay by default.
        assert placement[name] == ((False, 0.0) if hit else (True, 0.01)), name


def test_callable_rule_gets_name_and_param():
    model = _Net()
    seen = []

    def rule(name, param):
        seen.append((name, param))
        return param.numel() == 4 and "head" not in name

    placement = _placement(larsopt.param_groups(model, weight_decay=0.01, exclude=rule))
    assert {n for n, _ in seen} == {n for n, _ in model.named_parameters()}
    assert all(p is dict(model.named_parameters())[n] for n, p in seen)
    for name, param in model.named_parameters():
        assert placement[name] == ((False, 0.0) if rule(name, param) else (True, 0.01)), name


def test_none_excludes_nothing():
    model = _Net()
    groups = larsopt.param_groups(model, weight_decay=0.01, exclude=None)
    assert len(groups) == 1
    assert _placement(groups) == {n: (True, 0.01) for n, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "exclude,exclude_weight_decay",
    [("mxnet", "ndim"), ("ndim", None), (None, "ndim"), ("norm_and_bias", None), ("ndim", "mxnet"),
     (re.compile("bias"), re.compile("weight")), ("norm_and_bias", lambda n, p: n.startswith("head"))],
)
def test_exclude_weight_decay_is_independent(exclude, exclude_weight_decay):
    model = _Net()
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())

    def rule_of(rule):
        if rule is None:
            return lambda n, p: False
        if rule == "mxnet":
            return lambda n, p: n.endswith(("gamma", "beta", "bias"))
        if rule == "ndim":
            return lambda n, p: p.ndim <= 1
        if rule == "norm_and_bias":
            norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
            return lambda n, p: n.endswith(".bias") or isinstance(modules[n.rpartition(".")[0]], norm_types)
        if isinstance(rule, re.Pattern):
            return lambda n, p: rule.search(n) is not None
        return rule

    no_trust, no_decay = rule_of(exclude), rule_of(exclude_weight_decay)
    groups = larsopt.param_groups(model, weight_decay=0.5, exclude=exclude, exclude_weight_decay=exclude_weight_decay)
    placement = _placement(groups)
    for name, param in named.items():
        assert placement[name] == (not no_trust(name, param), 0.0 if no_decay(name, param) else 0.5), name
    assert len(groups) == len({(g["lars"], g["weight_decay"]) for g in groups})  # one group per combination


def test_frozen_params_are_left_out():
    model = _Net()
    model.stem.weight.requires_grad_(False)
    model.ln.requires_grad_(False)
    for exclude in ("mxnet", "ndim", "norm_and_bias", None):
        placement = _placement(larsopt.param_groups(model, weight_decay=0.1, exclude=exclude))
        assert not {"stem.weight", "ln.weight", "ln.bias"} & set(placement)
        assert set(placement) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_groups_cover_every_trainable_param_once_in_the_model_order():
    model = _Net()
    groups = larsopt.param_groups(model, weight_decay=0.1, exclude="norm_and_bias")
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    for group in groups:
        order = [n for n, _ in model.named_parameters() if n in group["param_names"]]
        assert group["param_names"] == order
        by_name = dict(model.named_parameters())
        assert all(p is by_name[n] for n, p in zip(group["param_names"], group["params"]))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1e-4, math.nan, math.inf, np.float32(-1.0), np.float64(math.nan)])
def test_bad_weight_decay_value(value):
    with pytest.raises(ValueError, match="weight_decay") as info:
        larsopt.param_groups(_Net(), weight_decay=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["0.1", True, np.bool_(True), [0.1], torch.tensor(0.1), 1j])
def test_weight_decay_of_the_wrong_type(value):
    with pytest.raises(TypeError, match="weight_decay") as info:
        larsopt.param_groups(_Net(), weight_decay=value)
    assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize("value", [np.float32(0.1), np.float64(1e-4), np.int64(1), np.int32(0), 2])
def test_weight_decay_takes_numpy_scalars_and_ints(value):
    groups = larsopt.param_groups(_Net(), weight_decay=value, exclude="norm_and_bias")
    decays = [g["weight_decay"] for g in groups if g["lars"]]
    assert decays == [float(value)] and type(decays[0]) is float  # the same number, as a Python float
    assert [g["weight_decay"] for g in groups if not g["lars"]] == [0.0]


@pytest.mark.parametrize("argument", ["exclude", "exclude_weight_decay"])
@pytest.mark.parametrize("value", ["bias", "MXNET", "norm"])
def test_unknown_preset(argument, value):
    # A plain string is a preset name, not a regex: an unknown one is an error, not a pattern.
    with pytest.raises(ValueError) as info:
        larsopt.param_groups(_Net(), **{argument: value})
    assert argument in str(info.value) and repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("argument", ["exclude", "exclude_weight_decay"])
@pytest.mark.parametrize("value", [42, 0.5, b"ndim", ["ndim"]])
def test_rule_of_the_wrong_type(argument, value):
    with pytest.raises(TypeError) as info:
        larsopt.param_groups(_Net(), **{argument: value})
    assert argument in str(info.value) and repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [[torch.zeros(3)], [("w", torch.zeros(3), 1)], [(3, torch.zeros(3))], "model",
                                 torch.zeros(3), 42])
def test_bad_model_or_named_params(bad):
    with pytest.raises(TypeError, match="model_or_named_params"):
        larsopt.param_groups(bad)


# --------------------------------------------------------------------------------------------
# End to end in LARS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", ["mxnet", "ndim", "norm_and_bias"])
def test_groups_work_in_lars(exclude):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    groups = larsopt.param_groups(model, weight_decay=0.05, exclude=exclude)
    opt = larsopt.LARS(groups, lr=0.2, eta=0.01, epsilon=0.0)
    assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in groups]
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x).square().mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    placement = _placement(opt.param_groups)
    opt.step()
    for name, param in model.named_parameters():
        lars, wd = placement[name]
        w, g = before[name], param.grad
        lam = 0.01 * w.norm() / (g.norm() + wd * w.norm()) if lars else 1.0  # no eta when excluded
        expected = w - 0.2 * lam * (g + wd * w)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-15, msg=name)


def test_named_groups_train_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    opt = larsopt.LARS(larsopt.param_groups(model, weight_decay=1e-4, exclude="norm_and_bias"), lr=1.0,
                       momentum=0.9, eta=0.02)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------
# Where weight decay comes from: param_groups(weight_decay=...) or LARS(weight_decay=...)
# --------------------------------------------------------------------------------------------


def _decay_seen(model, opt):
    """name -> the weight decay the optimizer's group applies to it."""
    return {name: group["weight_decay"] for group in opt.param_groups for name in group["param_names"]}


@pytest.mark.parametrize("exclude", ["ndim", "norm_and_bias", "mxnet", None, re.compile(r"\.bias$")])
def test_optimizer_weight_decay_reaches_the_groups_that_keep_it(exclude):
    model = _Net()
    opt = larsopt.LARS(larsopt.param_groups(model, exclude=exclude), lr=0.1, weight_decay=5e-4)
    excluded = larsopt.param_groups(model, exclude=exclude, weight_decay=1.0)
    no_decay = {name for group in excluded if group["weight_decay"] == 0.0 for name in group["param_names"]}
    assert set(_decay_seen(model, opt)) == {name for name, _ in model.named_parameters()}
    for name, decay in _decay_seen(model, opt).items():
        assert decay == (0.0 if name in no_decay else 5e-4), name


@pytest.mark.parametrize("exclude", ["ndim", "norm_and_bias"])
def test_both_spellings_give_the_same_optimizer(exclude):
    results = []
    for spelling in ("param_groups", "LARS"):
        torch.manual_seed(0)
        model = _Net().double()
        for param in model.parameters():
            nn.init.normal_(param)
        if spelling == "param_groups":
            opt = larsopt.LARS(larsopt.param_groups(model, weight_decay=5e-4, exclude=exclude), lr=0.1)
        else:
            opt = larsopt.LARS(larsopt.param_groups(model, exclude=exclude), lr=0.1, weight_decay=5e-4)
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        opt.step()
        results.append((_decay_seen(model, opt), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert 5e-4 in results[0][0].values() and 0.0 in results[0][0].values()
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_weight_decay_given_to_param_groups_wins_over_the_optimizer():
    # A per-group value beats the optimizer's default, as in any torch optimizer.
    model = _Net()
    opt = larsopt.LARS(larsopt.param_groups(model, weight_decay=1e-5, exclude="ndim"), lr=0.1, weight_decay=5e-4)
    assert set(_decay_seen(model, opt).values()) == {1e-5, 0.0}
    zero = larsopt.LARS(larsopt.param_groups(model, weight_decay=0.0, exclude="ndim"), lr=0.1, weight_decay=5e-4)
    assert set(_decay_seen(model, zero).values()) == {0.0}  # an explicit 0 is a value, not "unset"


def test_groups_without_weight_decay_take_a_torch_optimizer_default():
    model = _Net()
    opt = torch.optim.SGD(larsopt.param_groups(model, exclude="norm_and_bias"), lr=0.1, weight_decay=1e-3)
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 1e-3]


def test_only_excluded_groups_carry_weight_decay_by_default():
    groups = larsopt.param_groups(_Net(), exclude="norm_and_bias")
    assert [("weight_decay" in g, g.get("weight_decay")) for g in groups] == [(False, None), (True, 0.0)]
    groups = larsopt.param_groups(_Net(), exclude="mxnet")  # mxnet keeps weight decay everywhere
    assert all("weight_decay" not in g for g in groups)


# --------------------------------------------------------------------------------------------
# "norm_and_bias": torch's bias names, parametrizations, custom norm layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,is_bias", [
    ("bias", True), ("in_proj_bias", True), ("bias_k", True), ("bias_v", True), ("bias_ih", True),
    ("bias_hh", True), ("bias_ih_l0", True), ("bias_hh_l12", True), ("bias_ih_l0_reverse", True),
    ("bias_hh_l3_reverse", True), ("attn_bias", True),
    ("weight", False), ("in_proj_weight", False), ("weight_ih_l0", False), ("weight_hr_l0_reverse", False),
    ("biases", False), ("bias_scale", False), ("unbias", False), ("_bias", False), ("Bias", False),
    ("bias_ih_l0_forward", False), ("relative_position_bias_table", False),
])
def test_bias_name_rule(name, is_bias):
    assert (BIAS_NAME.fullmatch(name) is not None) == is_bias


def _excluded_by_norm_and_bias(model, **kwargs):
    groups = larsopt.param_groups(model, weight_decay=0.1, exclude="norm_and_bias", **kwargs)
    placement = _placement(groups)
    assert set(placement) == {name for name, _ in model.named_parameters()}
    return {name for name, (lars, decay) in placement.items() if not lars and decay == 0.0}, placement


def test_multihead_attention_biases():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    excluded, _ = _excluded_by_norm_and_bias(model)
    assert excluded == {"0.in_proj_bias", "0.bias_k", "0.bias_v", "0.out_proj.bias"}
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)  # q/k/v_proj_weight, still one in_proj_bias
    assert _excluded_by_norm_and_bias(separate)[0] == {"in_proj_bias", "out_proj.bias"}


@pytest.mark.parametrize("rnn", [
    nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
    nn.GRU(3, 4, num_layers=2),
    nn.RNN(3, 4, bidirectional=True),
    nn.LSTMCell(3, 4),
    nn.GRUCell(3, 4),
])
def test_recurrent_biases(rnn):
    excluded, placement = _excluded_by_norm_and_bias(nn.ModuleDict({"rnn": rnn}))
    assert excluded == {name for name in placement if name.split(".")[-1].startswith("bias_")}
    assert len(excluded) == sum(1 for name, _ in rnn.named_parameters() if "bias" in name) > 0
    assert all(placement[name] == (True, 0.1) for name in placement if ".weight_" in name)


def test_transformer_layer():
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    excluded, placement = _excluded_by_norm_and_bias(model)
    assert excluded == {"self_attn.in_proj_bias", "self_attn.out_proj.bias", "linear1.bias", "linear2.bias",
                        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}
    assert set(placement) - excluded == {"self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                         "linear1.weight", "linear2.weight"}


class _CustomNorm(nn.Module):
    """A norm layer that does not subclass torch's (as apex's or a model zoo's RMSNorm)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))


class _CustomNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = _CustomNorm(4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4, bias=False), _CustomNorm(4))])


def test_custom_norm_layer_needs_norm_types():
    model = _CustomNormNet()
    excluded, _ = _excluded_by_norm_and_bias(model)
    assert excluded == {"fc.bias"}  # by type only: nothing says _CustomNorm is a norm layer
    norm_params = {"norm.scale", "norm.shift", "blocks.0.1.scale", "blocks.0.1.shift"}
    for norm_types in (_CustomNorm, (_CustomNorm,), [_CustomNorm, nn.LayerNorm]):
        excluded, placement = _excluded_by_norm_and_bias(model, norm_types=norm_types)
        assert excluded == {"fc.bias"} | norm_params
        assert placement["fc.weight"] == placement["blocks.0.0.weight"] == (True, 0.1)


def test_norm_types_adds_to_the_built_in_types_and_covers_subclasses():
    class _Sub(_CustomNorm):
        pass

    model = nn.Sequential(_Sub(3), nn.BatchNorm1d(3), nn.Linear(3, 3, bias=False))
    excluded, _ = _excluded_by_norm_and_bias(model, norm_types=[_CustomNorm])
    assert excluded == {"0.scale", "0.shift", "1.weight", "1.bias"}


def test_norm_types_in_exclude_weight_decay_only():
    model = _CustomNormNet()
    groups = larsopt.param_groups(model, weight_decay=0.1, exclude=None, exclude_weight_decay="norm_and_bias",
                                  norm_types=_CustomNorm)
    placement = _placement(groups)
    assert {name for name, (_, decay) in placement.items() if decay == 0.0} == {
        "fc.bias", "norm.scale", "norm.shift", "blocks.0.1.scale", "blocks.0.1.shift"}
    assert all(lars for lars, _ in placement.values())


@pytest.mark.parametrize("bad", [_CustomNorm(2), "LayerNorm", [nn.LayerNorm, "RMSNorm"], int, [int], 3])
def test_norm_types_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="norm_types"):
        larsopt.param_groups(_CustomNormNet(), exclude="norm_and_bias", norm_types=bad)


def test_norm_types_without_the_norm_and_bias_rule_is_an_error():
    # It would be ignored: say so rather than silently doing nothing.
    with pytest.raises(ValueError, match="norm_types.*'norm_and_bias'"):
        larsopt.param_groups(_CustomNormNet(), exclude="ndim", norm_types=_CustomNorm)


def test_parametrized_tensors_count_as_the_tensor_they_stand_for():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    nn.utils.parametrizations.weight_norm(model[0])
    parametrize.register_parametrization(model[0], "bias", nn.Identity())
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    excluded, placement = _excluded_by_norm_and_bias(model)
    assert excluded == {"0.parametrizations.bias.original", "1.parametrizations.weight.original", "1.bias",
                        "2.bias"}
    assert placement["0.parametrizations.weight.original0"] == (True, 0.1)  # weight norm's g: a weight


def test_a_bias_shared_with_a_weight_slot_is_judged_by_identity():
    # A tensor registered under two names is listed once (torch's first name) and excluded if any
    # of its places makes it a bias or a norm parameter.
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[1].weight = model[0].bias
    excluded, placement = _excluded_by_norm_and_bias(model)
    assert set(placement) == {"0.weight", "0.bias", "1.bias"}
    assert excluded == {"0.bias", "1.bias"}
