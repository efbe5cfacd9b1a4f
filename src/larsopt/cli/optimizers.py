"""The optimizer of a run: ``--optimizer lars``, ``sgd`` or one of the peers' LARS (``larsopt.presets``).

Every optimizer gets the run's settings: ``--lr`` (the peak lr: the LR scheduler of the run
multiplies each group's lr by the same warm-up and decay factor), ``--momentum``, ``--weight-decay``
and ``--eta``, each passed as the preset's own argument of that meaning. ``--exclude`` is applied
with the peer's own mechanism, so each preset runs as its users run it; where that mechanism cannot
say what the rule says, the peer's rule wins (documented per preset in docs/cli.md):

* lars, sgd: ``larsopt.param_groups`` groups (the excluded get ``lars=False`` and, but under the mxnet
  rule, ``weight_decay=0``).
* timm, bolts: param groups with the excluded tensors' ``weight_decay=0``; the peer adapts exactly the
  groups with weight decay.
* pytorch_optimizer: the same groups; the peer keeps every 1-D tensor out of the trust ratio and weight
  decay whatever the rule.
* larc: the same groups (LARC's wrapped SGD has per-group weight decay); LARC adapts every tensor.
* optax: ``weight_decay_mask`` and ``trust_ratio_mask`` of the excluded names.
* mlperf: ``skip_list`` of the names without a trust ratio (a skipped name loses weight decay too).
* ssl: the excluded tensors in groups with ``weight_decay_filter`` / ``lars_adaptation_filter``
  (which act on 1-D tensors, as in FAIR's code).
* mxnet: the names MXNet's Gluon gives (a norm layer's weight and bias are ``gamma`` and ``beta``), so
  MXNet's name rule keeps norm layers and biases out of the trust ratio; the rule's groups choose weight
  decay.

Every LARS reports the trust ratios its steps applied (``telemetry`` on in each group), for trust.png.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import larsopt
from larsopt import presets
from larsopt.cli.config import OPTIMIZERS, PRESETS, RunConfig
from larsopt.cli.errors import UsageError
from larsopt.grouping import NORM_LAYERS

# larsopt's own recipe: the epsilon of the trust ratio's denominator (the presets keep their own).
TRUST_EPSILON = 1e-8
# MXNet Gluon's names of a norm layer's scale and shift.
_GLUON_NORM_NAMES = {"weight": "gamma", "bias": "beta"}


def _pairs(group: dict[str, Any]) -> list[tuple[str, Tensor]]:
    return list(zip(group["param_names"], group["params"]))


def _names(groups: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> set[str]:
    return {name for group in groups if keep(group) for name in group["param_names"]}


def _decayed_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule's groups as a torch-style peer takes them: only ``weight_decay`` per group."""
    return [{"params": _pairs(group), "weight_decay": group["weight_decay"]} for group in groups]


def _one_group(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every param in one group, for a peer that takes per-tensor rules instead of groups."""
    return [{"params": [pair for group in groups for pair in _pairs(group)]}]


def _skip_list(groups: list[dict[str, Any]]) -> list[str]:
    """MLPerf's ``skip_list`` (substrings of param names) that skips exactly the rule's tensors
    without a trust ratio: their full names, checked not to match another name."""
    skipped = sorted(_names(groups, lambda group: not group["lars"]))
    for name in _names(groups, lambda group: group["lars"]):
        inside = [skip for skip in skipped if skip in name]
        if inside:
            raise UsageError(f"--optimizer mlperf: skip_list matches substrings of names, and the excluded "
                             f"{inside[0]!r} is part of {name!r}, which --exclude keeps in the trust ratio")
    return skipped


def _gluon_names(model: nn.Module) -> dict[str, str]:
    """torch's param name -> the name MXNet Gluon gives it (norm layers: ``gamma``, ``beta``)."""
    modules = dict(model.named_modules())
    renamed = {}
    for name, _ in model.named_parameters():
        owner, _, own = name.rpartition(".")
        if isinstance(modules.get(owner), NORM_LAYERS) and own in _GLUON_NORM_NAMES:
            renamed[name] = f"{owner}.{_GLUON_NORM_NAMES[own]}" if owner else _GLUON_NORM_NAMES[own]
    return renamed


def _lars(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return larsopt.LARS(groups, lr=config.peak_lr, momentum=config.momentum, eta=config.eta, epsilon=TRUST_EPSILON,
                        telemetry=True)


def _sgd(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    # SGD keeps the groups' "lars" flag only to log the trust ratio LARS would use.
    return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum)


def _timm(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.timm(_decayed_groups(groups), lr=config.peak_lr, momentum=config.momentum,
                        weight_decay=config.weight_decay, trust_coeff=config.eta)


def _pytorch_optimizer(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.pytorch_optimizer(_decayed_groups(groups), lr=config.peak_lr, weight_decay=config.weight_decay,
                                     momentum=config.momentum, trust_coefficient=config.eta)


def _bolts(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.bolts(_decayed_groups(groups), lr=config.peak_lr, momentum=config.momentum,
                         weight_decay=config.weight_decay, trust_coefficient=config.eta)


def _larc(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.larc(_decayed_groups(groups), lr=config.peak_lr, momentum=config.momentum,
                        weight_decay=config.weight_decay, trust_coefficient=config.eta)


def _optax(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    undecayed = _names(groups, lambda group: group["weight_decay"] == 0)
    unadapted = _names(groups, lambda group: not group["lars"])
    return presets.optax(_one_group(groups), learning_rate=config.peak_lr, weight_decay=config.weight_decay,
                         weight_decay_mask=lambda name, param: name not in undecayed,
                         trust_coefficient=config.eta, trust_ratio_mask=lambda name, param: name not in unadapted,
                         momentum=config.momentum)


def _mlperf(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.mlperf(_one_group(groups), learning_rate=config.peak_lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, eeta=config.eta, skip_list=_skip_list(groups))


def _ssl(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return presets.ssl([{"params": _pairs(group), "weight_decay_filter": group["weight_decay"] == 0,
                         "lars_adaptation_filter": not group["lars"]} for group in groups],
                       lr=config.peak_lr, weight_decay=config.weight_decay, momentum=config.momentum, eta=config.eta)


def _mxnet(config: RunConfig, model: nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    renamed = _gluon_names(model)
    return presets.mxnet([{"params": [(renamed.get(name, name), param) for name, param in _pairs(group)],
                           "weight_decay": group["weight_decay"]} for group in groups],
                         learning_rate=config.peak_lr, momentum=config.momentum, eta=config.eta,
                         wd=config.weight_decay)


_BUILDERS = {"lars": _lars, "sgd": _sgd, "timm": _timm, "pytorch_optimizer": _pytorch_optimizer, "bolts": _bolts,
             "larc": _larc, "optax": _optax, "mlperf": _mlperf, "ssl": _ssl, "mxnet": _mxnet}
assert tuple(_BUILDERS) == OPTIMIZERS


def build(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names over ``model``'s params, with the run's settings."""
    exclude = None if config.exclude == "none" else config.exclude
    groups = larsopt.param_groups(model, weight_decay=config.weight_decay, exclude=exclude)
    optimizer = _BUILDERS[config.optimizer](config, model, groups)
    if config.optimizer in PRESETS:
        # A preset takes only its peer's arguments and group keys; telemetry is a group key of the
        # larsopt.LARS it returns, read at every step.
        for group in optimizer.param_groups:
            group["telemetry"] = True
    return optimizer


def trust_layers(optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor, float]]:
    """(name, param, weight decay) of every tensor that gets a trust ratio: a group's ``lars`` flag,
    and for timm's and Bolts' rule (``adapt_when="weight_decay"``) a weight decay that is not 0."""
    return [(name, param, group["weight_decay"])
            for group in optimizer.param_groups
            if group.get("lars", True)
            and not (group.get("adapt_when") == "weight_decay" and group["weight_decay"] == 0)
            for name, param in zip(group["param_names"], group["params"])]
