"""larsopt.param_groups: presets, regex, callable, weight-decay override, frozen params, bad input,
and the groups used end to end in larsopt.LARS."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import larsopt

# Tiny tensors: one thread is faster and keeps the run time independent of machine load.
pytestmark = pytest.mark.usefixtures("single_thread")


def _placement(groups):
    """name -> (trust ratio on, weight decay) for every param in the groups."""
    out = {}
    for group in groups:
        assert set(group) >= {"params", "param_names", "lars", "weight_decay"}
        assert len(group["params"]) == len(group["param_names"]) > 0
        for name in group["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (group["lars"], group["weight_decay"])
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


@pytest.mark.parametrize("value", [-1e-4, math.nan, "0.1", True])
def test_bad_weight_decay(value):
    with pytest.raises(ValueError, match="weight_decay"):
        larsopt.param_groups(_Net(), weight_decay=value)


@pytest.mark.parametrize("argument", ["exclude", "exclude_weight_decay"])
@pytest.mark.parametrize("value", ["bias", "MXNET", "norm", 42, 0.5])
def test_bad_rule(argument, value):
    # A plain string is a preset name, not a regex: an unknown one is an error, not a pattern.
    with pytest.raises(ValueError) as info:
        larsopt.param_groups(_Net(), **{argument: value})
    assert argument in str(info.value) and repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [[torch.zeros(3)], [("w", torch.zeros(3), 1)], [(3, torch.zeros(3))], "model"])
def test_bad_model_or_named_params(bad):
    with pytest.raises(ValueError, match="model_or_named_params"):
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
