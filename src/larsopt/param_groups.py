"""``larsopt.param_groups``: split a model's parameters by whether they get the trust ratio and
whether they get weight decay.

Rules (``exclude`` / ``exclude_weight_decay``):

* ``"mxnet"``: names ending in ``gamma``, ``beta`` or ``bias`` (plain suffix test, as MXNet's
  ``param_idx2name`` rule): no trust ratio, weight decay kept.
* ``"ndim"``: tensors with ``ndim <= 1``: no trust ratio and no weight decay (the
  self-supervised practice: SimCLR, BYOL, Barlow Twins, MoCo v3).
* ``"norm_and_bias"``: every parameter of a normalisation layer (found by module type) and every
  ``bias`` of any module: no trust ratio and no weight decay (the MLPerf ResNet reference).
* a compiled regular expression (``re.compile(...)``), searched in the parameter name;
* a callable ``(name, param) -> bool``;
* ``None``: nothing.

``exclude_weight_decay`` defaults to the preset's own rule (``"mxnet"`` keeps weight decay), and
to the same rule as ``exclude`` for a regex or a callable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

Rule = Union[str, "re.Pattern[str]", Callable[[str, Tensor], bool], None]

PRESETS = ("mxnet", "ndim", "norm_and_bias")

# Module types whose parameters are normalisation scales and shifts.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

_SAME_AS_PRESET: Any = object()


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or param_name == "bias":
                names.add(prefix + param_name)
    return names


def _predicate(rule: Rule, argument: str, model: nn.Module | None) -> Callable[[str, Tensor], bool]:
    if rule is None:
        return lambda name, param: False
    if isinstance(rule, re.Pattern):
        return lambda name, param: rule.search(name) is not None
    if isinstance(rule, str):
        if rule == "mxnet":
            return lambda name, param: name.endswith(("gamma", "beta", "bias"))
        if rule == "ndim":
            return lambda name, param: param.ndim <= 1
        if rule == "norm_and_bias":
            if model is None:
                raise ValueError(f"Invalid {argument}: 'norm_and_bias' finds norm layers by module type, so it "
                                 "needs an nn.Module, not a list of (name, param) pairs")
            excluded = _norm_and_bias_names(model)
            return lambda name, param: name in excluded
        raise ValueError(f"Invalid {argument}: {rule!r}; expected one of {', '.join(map(repr, PRESETS))}, "
                         "None, a compiled regex (re.compile(...)) or a callable (name, param) -> bool")
    if callable(rule):
        return lambda name, param: bool(rule(name, param))
    raise ValueError(f"Invalid {argument}: {rule!r}; expected one of {', '.join(map(repr, PRESETS))}, None, "
                     "a compiled regex or a callable (name, param) -> bool")


def param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]],
    weight_decay: float = 0.0,
    exclude: Rule = "ndim",
    exclude_weight_decay: Rule = _SAME_AS_PRESET,
) -> list[dict[str, Any]]:
    """Param groups for :class:`larsopt.LARS` with independent control of the trust ratio and of
    weight decay.

    Returns up to four groups (only non-empty ones, in a fixed order), each with ``params``,
    ``param_names``, ``weight_decay`` and ``lars``. Parameters with ``requires_grad=False`` are
    left out.

    Example::

        opt = larsopt.LARS(larsopt.param_groups(model, weight_decay=5e-5, exclude="norm_and_bias"),
                           lr=0.1, momentum=0.9)
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; expected a number >= 0")
    model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
    named = list(model.named_parameters() if model is not None else model_or_named_params)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise ValueError("Invalid model_or_named_params: expected an nn.Module or (name, tensor) pairs such "
                             f"as model.named_parameters(), got an item {item!r:.80}")
    no_trust = _predicate(exclude, "exclude", model)
    if exclude_weight_decay is _SAME_AS_PRESET:
        exclude_weight_decay = None if exclude == "mxnet" else exclude
    no_decay = _predicate(exclude_weight_decay, "exclude_weight_decay", model)

    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        key = (not no_trust(name, param), not no_decay(name, param))
        group = groups.setdefault(
            key, {"params": [], "param_names": [], "lars": key[0], "weight_decay": weight_decay if key[1] else 0.0}
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in ((True, True), (True, False), (False, True), (False, False)) if key in groups]
