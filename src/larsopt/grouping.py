"""``larsopt.param_groups``: split a model's parameters by whether they get the trust ratio and
whether they get weight decay.

Rules (``exclude`` / ``exclude_weight_decay``):

* ``"mxnet"``: names ending in ``gamma``, ``beta`` or ``bias`` (plain suffix test, as MXNet's
  ``param_idx2name`` rule): no trust ratio, weight decay kept.
* ``"ndim"``: tensors with ``ndim <= 1``: no trust ratio and no weight decay (the
  self-supervised practice: SimCLR, BYOL, Barlow Twins, MoCo v3).
* ``"norm_and_bias"``: every parameter of a normalisation layer and every bias: no trust ratio
  and no weight decay (the MLPerf ResNet reference).

  - A normalisation layer is found by module type, never by name: an instance of one of
    :data:`NORM_LAYERS` (every batch and instance norm, ``LayerNorm``, ``GroupNorm``,
    ``LocalResponseNorm``, ``RMSNorm``) or of a subclass, or of a type given in ``norm_types``.
  - A bias is found by the parameter's own name in its module, whatever the module, as torch
    names them (:data:`BIAS_NAME`): ``bias``, a name ending in ``_bias`` (``in_proj_bias``),
    ``bias_k``/``bias_v`` (``nn.MultiheadAttention``) and the recurrent layers'
    ``bias_ih``/``bias_hh`` with their ``_l<k>`` and ``_reverse`` suffixes (``bias_ih_l0``,
    ``bias_hh_l1_reverse``).
  - A parametrized tensor (``torch.nn.utils.parametrize``) counts as the tensor it stands for:
    ``lin.parametrizations.bias.original`` is ``lin``'s bias.

* a compiled regular expression (``re.compile(...)``), searched in the parameter name;
* a callable ``(name, param) -> bool``;
* ``None``: nothing.

``exclude_weight_decay`` defaults to the preset's own rule (``"mxnet"`` keeps weight decay), and
to the same rule as ``exclude`` for a regex or a callable.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

Rule = Union[str, "re.Pattern[str]", Callable[[str, Tensor], bool], None]

PRESETS = ("mxnet", "ndim", "norm_and_bias")

#: Module types whose parameters are normalisation scales and shifts (subclasses included).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

#: A parameter's own name (the part after the last dot) that torch gives a bias.
BIAS_NAME = re.compile(r"bias|.+_bias|bias_[kv]|bias_(?:ih|hh)(?:_l\d+(?:_reverse)?)?")

_SAME_AS_PRESET: Any = object()

_RULES_ALLOWED = (f"one of {', '.join(map(repr, PRESETS))}, None, a compiled regex (re.compile(...)) "
                  "or a callable (name, param) -> bool")


def _owner_and_tensor_name(module_name: str, module: nn.Module, param_name: str) -> tuple[str, str]:
    """The module a parameter belongs to and its name there, seeing through parametrizations:
    ``lin.parametrizations.bias``'s ``original`` is ``lin``'s ``bias``."""
    if isinstance(module, parametrize.ParametrizationList):
        parts = module_name.split(".")  # [..owner, "parametrizations", tensor name]
        return ".".join(parts[:-2]), parts[-1]
    return module_name, param_name


def _norm_and_bias_params(model: nn.Module, norm_layers: tuple[type[nn.Module], ...]) -> set[Tensor]:
    """The parameters of ``model`` that are biases or belong to a norm layer (by identity, so a
    tensor shared under several names is judged once, wherever it appears)."""
    modules = dict(model.named_modules())
    excluded = set()
    for module_name, module in modules.items():
        for param_name, param in module.named_parameters(recurse=False):
            owner_name, tensor_name = _owner_and_tensor_name(module_name, module, param_name)
            if isinstance(modules[owner_name], norm_layers) or BIAS_NAME.fullmatch(tensor_name):
                excluded.add(param)
    return excluded


def _predicate(rule: Rule, argument: str, model: nn.Module | None,
               norm_layers: tuple[type[nn.Module], ...]) -> Callable[[str, Tensor], bool]:
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
            excluded = _norm_and_bias_params(model, norm_layers)
            return lambda name, param: param in excluded
        raise ValueError(f"Invalid {argument}: {rule!r}; expected {_RULES_ALLOWED}")
    if callable(rule):
        return lambda name, param: bool(rule(name, param))
    raise TypeError(f"Invalid {argument}: {rule!r} of type {type(rule).__name__}; expected {_RULES_ALLOWED}")


def _check_weight_decay(weight_decay: Any) -> float | None:
    """``weight_decay`` as a float (``None`` kept): any real number, NumPy scalars included."""
    if weight_decay is None:
        return None
    if not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, (bool, torch.Tensor)):
        raise TypeError(f"Invalid weight_decay: {weight_decay!r} of type {type(weight_decay).__name__}; expected "
                        "None (the optimizer's weight_decay) or a real number >= 0")
    value = float(weight_decay)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; expected None (the optimizer's weight_decay) "
                         "or a finite number >= 0")
    return value


def _check_norm_types(norm_types: Any) -> tuple[type[nn.Module], ...]:
    """``norm_types`` (one module class or an iterable of them) as a tuple of classes."""
    classes = (norm_types,) if isinstance(norm_types, type) else norm_types
    try:
        classes = tuple(classes)
    except TypeError:
        raise TypeError(f"Invalid norm_types: {norm_types!r}; expected an nn.Module subclass or an iterable of "
                        "them, such as (MyNorm, apex.normalization.FusedLayerNorm)") from None
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"Invalid norm_types: {cls!r} is not an nn.Module subclass; expected module classes, "
                            "such as (MyNorm, apex.normalization.FusedLayerNorm)")
    return classes


def _check_named(model_or_named_params: Any) -> tuple[nn.Module | None, list[tuple[str, Tensor]]]:
    """The module (if given) and the (name, param) pairs."""
    expected = "expected an nn.Module or (name, tensor) pairs such as model.named_parameters()"
    if isinstance(model_or_named_params, nn.Module):
        return model_or_named_params, list(model_or_named_params.named_parameters())
    if isinstance(model_or_named_params, (str, bytes, torch.Tensor)) or not isinstance(model_or_named_params,
                                                                                         Iterable):
        raise TypeError(f"Invalid model_or_named_params: {model_or_named_params!r:.80} of type "
                        f"{type(model_or_named_params).__name__}; {expected}")
    named = list(model_or_named_params)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"Invalid model_or_named_params: {expected}, got an item {item!r:.80}")
    return None, named


def param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]],
    weight_decay: float | None = None,
    exclude: Rule = "ndim",
    exclude_weight_decay: Rule = _SAME_AS_PRESET,
    norm_types: type[nn.Module] | Iterable[type[nn.Module]] = (),
) -> list[dict[str, Any]]:
    """Param groups for :class:`larsopt.LARS` with independent control of the trust ratio and of
    weight decay.

    Returns up to four groups (only non-empty ones, in a fixed order), each with ``params``,
    ``param_names`` and ``lars``. Parameters with ``requires_grad=False`` are left out.

    Weight decay: groups excluded by ``exclude_weight_decay`` get ``weight_decay=0.0``. The
    others get ``weight_decay`` when it is given here, and otherwise no ``weight_decay`` key, so
    they take the optimizer's (``LARS(groups, weight_decay=...)``), as any torch param group
    without the key does. A value given here wins over the optimizer's, as a per-group setting does.

    Args:
        model_or_named_params: an ``nn.Module``, or ``(name, tensor)`` pairs such as
            ``model.named_parameters()`` (the ``"norm_and_bias"`` rule needs the module).
        weight_decay: ``None`` (the optimizer's value) or a real number >= 0 (NumPy scalars too).
        exclude: which parameters get no trust ratio (see the module docstring for the rules).
        exclude_weight_decay: which parameters get no weight decay; by default the preset's own
            rule (nothing for ``"mxnet"``), or ``exclude`` itself for a regex or a callable.
        norm_types: module classes to treat as normalisation layers under ``"norm_and_bias"``,
            in addition to :data:`NORM_LAYERS` (for norm layers that do not subclass torch's).

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: a bad value: a negative or non-finite ``weight_decay``, an unknown preset,
            ``"norm_and_bias"`` without a module, ``norm_types`` without ``"norm_and_bias"``.

    Example::

        opt = larsopt.LARS(larsopt.param_groups(model, exclude="norm_and_bias"),
                           lr=0.1, momentum=0.9, weight_decay=5e-5)
    """
    weight_decay = _check_weight_decay(weight_decay)
    extra_norm_types = _check_norm_types(norm_types)
    model, named = _check_named(model_or_named_params)
    if exclude_weight_decay is _SAME_AS_PRESET:
        exclude_weight_decay = None if exclude == "mxnet" else exclude
    if extra_norm_types and "norm_and_bias" not in (exclude, exclude_weight_decay):
        raise ValueError(f"Invalid norm_types: {norm_types!r} is only used by the 'norm_and_bias' rule, and neither "
                         f"exclude ({exclude!r}) nor exclude_weight_decay ({exclude_weight_decay!r}) is "
                         "'norm_and_bias'")
    norm_layers = NORM_LAYERS + extra_norm_types
    no_trust = _predicate(exclude, "exclude", model, norm_layers)
    no_decay = _predicate(exclude_weight_decay, "exclude_weight_decay", model, norm_layers)

    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        trust, decay = key = (not no_trust(name, param), not no_decay(name, param))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"params": [], "param_names": [], "lars": trust}
            if not decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in ((True, True), (True, False), (False, True), (False, False)) if key in groups]
