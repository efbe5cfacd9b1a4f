"""Every other LARS as a ``larsopt.LARS``: one function per peer, taking that peer's own constructor
arguments (same names, defaults and order after ``params``) and giving its numbers, quirks included.

A preset is data: the peer's arguments mapped onto :class:`larsopt.options.LarsOptions`, and the
peer's per-tensor rules (``ndim``, masks, name lists) turned into param groups. No preset has a
formula of its own; the formula families are in ``docs/migrating/README.md``.

``params`` takes what the peer takes: tensors, or dict groups carrying the peer's own per-group
keys (``trust_coeff`` for timm, ``weight_decay_filter`` for FAIR SSL, ...), and also
``(name, tensor)`` pairs (``model.named_parameters()``), which name-based rules need. Groups split by
a per-tensor rule become several ``larsopt.LARS`` groups (an LR scheduler treats them as one).
Arguments that only choose a peer's code path (``foreach``, ``name``) are accepted and have no
effect: larsopt picks its own implementation (``impl``). The returned optimizer's groups hold
larsopt's keys (``eta`` for timm's ``trust_coeff``, ``epsilon`` for ``eps``, ...): change those, not the
peer's names, after construction. Values the peer accepts and larsopt refuses (momentum >= 1,
dampening outside [0, 1], negative coefficients) raise ``ValueError`` naming the peer's argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from larsopt.options import OPTIMIZER_SETTINGS, group_defaults
from larsopt.optim import LARS

#: The param-group keys of larsopt.LARS that change what it computes: a peer's group carrying one that is
#: not the peer's own would change the numbers while the peer ignores it. (The settings of how a step is
#: stored and run, impl, multi_precision, capturable and telemetry, are welcome in any group.)
LARS_SETTINGS = frozenset(group_defaults()) - frozenset(OPTIMIZER_SETTINGS)

__all__ = ["bolts", "larc", "mlperf", "mxnet", "optax", "pytorch_optimizer", "ssl", "timm"]

_Rule = Callable[[str | None, Tensor, dict[str, Any]], dict[str, Any]]


def _named_groups(params: Any, peer: str) -> list[dict[str, Any]]:
    """``params`` as dict groups, each with ``params`` (tensors) and ``param_names`` (or ``None``)."""
    if isinstance(params, Tensor):
        raise TypeError(f"presets.{peer}: params must be an iterable of tensors, (name, tensor) pairs or dicts, got "
                        f"a single tensor of shape {tuple(params.shape)}; wrap it in a list")
    items = list(params)
    groups = items if items and all(isinstance(item, Mapping) for item in items) else [{"params": items}]
    normalised = []
    for group in groups:
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"presets.{peer}: mix of dict groups and tensors in params; give all dicts or none")
        members = group["params"]
        members = [members] if isinstance(members, Tensor) else list(members)
        pairs = [member for member in members if isinstance(member, tuple)]
        if pairs and len(pairs) != len(members):
            raise TypeError(f"presets.{peer}: a group mixes (name, tensor) pairs and bare tensors")
        names = [name for name, _ in members] if pairs else group.get("param_names")
        tensors = [tensor for _, tensor in members] if pairs else members
        normalised.append({**{k: v for k, v in group.items() if k not in ("params", "param_names")},
                           "params": tensors, "param_names": names})
    return normalised


def _build(params: Any, peer: str, peer_defaults: dict[str, Any], translate: Callable[[dict[str, Any]], dict[str, Any]],
           fixed: dict[str, Any], rule: _Rule | None = None, needs_names: bool = False,
           spelled: Mapping[str, str] | None = None) -> LARS:
    """A ``larsopt.LARS`` over ``params``: every group's peer keys (over ``peer_defaults``) translated
    to larsopt's, ``fixed`` options for the peer's formula, and the tensors of a group split by
    ``rule(name, tensor, peer_group) -> larsopt overrides``. ``spelled``: larsopt name -> the peer's, for
    error messages."""
    groups = []
    for group in _named_groups(params, peer):
        names = group.pop("param_names")
        tensors = group.pop("params")
        peer_group = {**peer_defaults, **group}
        settings = {**fixed, **translate(peer_group)}
        extra = {key: value for key, value in group.items() if key not in peer_defaults}  # user metadata
        clashing = sorted(key for key in extra if key in LARS_SETTINGS)
        if clashing:
            raise ValueError(f"presets.{peer}: param group key(s) {clashing} are larsopt settings, not {peer}'s "
                             f"(its per-group keys: {sorted(peer_defaults)}); {peer} would ignore them: remove "
                             "them, or build a larsopt.LARS directly")
        if rule is None:
            groups.append(_group(tensors, names, {**settings, **extra}))
            continue
        if needs_names and names is None:
            raise ValueError(f"presets.{peer}: a rule of these arguments matches param names; pass (name, tensor) "
                             "pairs (model.named_parameters()) instead of bare tensors")
        split: dict[tuple[tuple[str, Any], ...], tuple[list[Tensor], list[str]]] = {}
        for index, tensor in enumerate(tensors):
            name = names[index] if names is not None else None
            key = tuple(sorted(rule(name, tensor, peer_group).items()))
            members = split.setdefault(key, ([], []))
            members[0].append(tensor)
            members[1].append(name)
        for key, (members, member_names) in split.items():
            groups.append(_group(members, member_names if names is not None else None,
                                 {**settings, **dict(key), **extra}))
    try:
        return LARS(groups, **fixed)
    except ValueError as error:
        message = str(error)
        for name, peer_name in (spelled or {}).items():
            message = message.replace(f"Invalid {name}:", f"Invalid {peer_name}:")
        raise ValueError(f"presets.{peer}: {message}") from None


def _group(tensors: list[Tensor], names: list[str] | None, settings: dict[str, Any]) -> dict[str, Any]:
    group = {"params": list(zip(names, tensors)) if names is not None else tensors, **settings}
    return group


def _plain(tensor_rule: bool) -> dict[str, Any]:
    """The overrides of a tensor a peer's rule keeps out of LARS: no trust ratio, no weight decay."""
    return {} if tensor_rule else {"lars": False, "weight_decay": 0.0}


def _mask(mask: Any, argument: str, peer: str) -> Callable[[str | None, Tensor], bool]:
    """optax's masks: a bool for every tensor, or a callable ``(name, tensor) -> bool``."""
    if mask is None:  # optax: no mask, the transform applies everywhere
        return lambda name, tensor: True
    if isinstance(mask, bool):
        return lambda name, tensor: mask
    if callable(mask):
        def applies(name: str | None, tensor: Tensor) -> bool:
            if name is None:
                raise ValueError(f"presets.{peer}: a callable {argument} takes (name, param); pass (name, tensor) "
                                 "pairs (model.named_parameters()) instead of bare tensors")
            return bool(mask(name, tensor))
        return applies
    raise TypeError(f"presets.{peer}: {argument} must be a bool or a callable (name, param) -> bool, got "
                    f"{type(mask).__name__}")


def _check_nesterov(peer: str, nesterov: bool, momentum: float, dampening: float) -> None:
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"presets.{peer}: Invalid nesterov: True with momentum={momentum!r} and "
                         f"dampening={dampening!r}; Nesterov momentum requires a momentum and zero dampening")


_TORCH_SGD = dict(momentum_form="torch", trust_norm="sum", buffer_start="update")


def _nesterov(group: dict[str, Any]) -> bool:
    """torch SGD's rule: Nesterov only changes a step with momentum (a group with momentum 0 ignores it)."""
    return bool(group["nesterov"]) and group["momentum"] != 0


def timm(params: Iterable[Any], lr: float = 1.0, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
         nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8, trust_clip: bool = False,
         always_adapt: bool = False, foreach: bool | None = None) -> LARS:
    """``timm.optim.Lars`` (timm 1.0.x): torch-SGD momentum with dampening; the trust ratio (and weight
    decay) only in groups whose ``weight_decay != 0``, or every group with ``always_adapt``; a zero
    norm gives ratio 1 with weight decay still added; ``trust_clip`` (LARC) clips that ratio too."""
    _check_nesterov("timm", nesterov, momentum, dampening)
    defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                    trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                    foreach=foreach)
    return _build(params, "timm", defaults, lambda g: dict(
        lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"], weight_decay=g["weight_decay"],
        nesterov=_nesterov(g), eta=g["trust_coeff"], epsilon=g["eps"], trust_clip=g["trust_clip"],
        adapt_when="always" if g["always_adapt"] else "weight_decay"), fixed=dict(_TORCH_SGD),
        spelled=dict(eta="trust_coeff", epsilon="eps"))


def pytorch_optimizer(params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9,
                      dampening: float = 0.0, trust_coefficient: float = 1e-3, nesterov: bool = False,
                      foreach: bool | None = None, maximize: bool = False) -> LARS:
    """``pytorch_optimizer.LARS`` (4.x): only tensors with ``ndim > 1`` get the trust ratio and weight
    decay (the others take plain momentum SGD); no epsilon, ratio 1 only where |w| or
    |g| + wd |w| is 0; the momentum buffer starts at zero and is dampened from the first step."""
    if not (isinstance(dampening, (int, float)) and 0.0 <= dampening < 1.0):
        raise ValueError(f"presets.pytorch_optimizer: Invalid dampening: {dampening!r}; expected a number in [0, 1) "
                         "(pytorch-optimizer's range)")
    defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                    trust_coefficient=trust_coefficient, nesterov=nesterov, foreach=foreach)
    return _build(params, "pytorch_optimizer", defaults, lambda g: dict(
        lr=g["lr"], weight_decay=g["weight_decay"], momentum=g["momentum"], dampening=g["dampening"],
        eta=g["trust_coefficient"], nesterov=_nesterov(g)),
        fixed=dict(momentum_form="torch", trust_norm="sum", epsilon=0.0, buffer_start="zeros",
                   fallback_on="zero_denominator", maximize=maximize),
        rule=lambda name, tensor, g: _plain(tensor.ndim > 1), spelled=dict(eta="trust_coefficient"))


def bolts(params: Iterable[Any], lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
          nesterov: bool = False, trust_coefficient: float = 0.001, eps: float = 1e-8) -> LARS:
    """Lightning Bolts' ``pl_bolts.optimizers.LARS`` (0.7): the trust ratio and weight decay only where
    ``weight_decay != 0`` and neither |w| nor |g| is 0; elsewhere the raw gradient, with no weight
    decay at all; torch-SGD momentum."""
    _check_nesterov("bolts", nesterov, momentum, dampening)
    defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                    trust_coefficient=trust_coefficient, eps=eps)
    return _build(params, "bolts", defaults, lambda g: dict(
        lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"], weight_decay=g["weight_decay"],
        nesterov=_nesterov(g), eta=g["trust_coefficient"], epsilon=g["eps"]),
        fixed=dict(_TORCH_SGD, adapt_when="weight_decay", fallback="plain_step"),
        spelled=dict(eta="trust_coefficient", epsilon="eps"))


def larc(params: Iterable[Any], lr: float = 1e-3, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
         nesterov: bool = False, trust_coefficient: float = 0.02, clip: bool = True, eps: float = 1e-8) -> LARS:
    """apex ``LARC(torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov),
    trust_coefficient, clip, eps)``: the ratio c |w| / (|g| + wd |w| + eps) on (g + wd w) in every
    group (weight decay 0 too), clipped to min(ratio / lr, 1) in clip mode; a tensor with |w| or |g|
    equal to 0 takes its raw gradient (no ratio, clip or weight decay); torch SGD's momentum.
    ``trust_coefficient``, ``clip`` and ``eps`` are LARC's, the same for every group."""
    _check_nesterov("larc", nesterov, momentum, dampening)
    defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    return _build(params, "larc", defaults, lambda g: dict(
        lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"], weight_decay=g["weight_decay"],
        nesterov=_nesterov(g)),
        fixed=dict(_TORCH_SGD, eta=trust_coefficient, epsilon=eps, trust_clip=clip, fallback="plain_step"),
        spelled=dict(eta="trust_coefficient", epsilon="eps", trust_clip="clip"))


def optax(params: Iterable[Any], learning_rate: float, weight_decay: float = 0.0, weight_decay_mask: Any = True,
          trust_coefficient: float = 0.001, eps: float = 0.0, trust_ratio_mask: Any = True, momentum: float = 0.9,
          nesterov: bool = False) -> LARS:
    """``optax.lars`` (0.2.x): u = g + wd w (where ``weight_decay_mask``), ratio c |w| / (|u| + eps)
    (where ``trust_ratio_mask``; 1 where |w| or |u| is 0), lr inside the momentum trace. A mask is a
    bool or a callable ``(name, param) -> bool`` (True: apply). ``learning_rate`` is a number: for
    an optax schedule, use a torch LR scheduler on the returned optimizer."""
    if callable(learning_rate) or not isinstance(learning_rate, (int, float)):
        raise TypeError(f"presets.optax: learning_rate must be a number, got {type(learning_rate).__name__}; for a "
                        "schedule use a torch.optim.lr_scheduler on the returned optimizer")
    decays = _mask(weight_decay_mask, "weight_decay_mask", "optax")
    adapts = _mask(trust_ratio_mask, "trust_ratio_mask", "optax")
    named = callable(weight_decay_mask) or callable(trust_ratio_mask)

    def rule(name: str | None, tensor: Tensor, g: dict[str, Any]) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if not decays(name, tensor):
            overrides["weight_decay"] = 0.0
        if not adapts(name, tensor):
            overrides["lars"] = False
        return overrides

    return _build(params, "optax", dict(lr=learning_rate, weight_decay=weight_decay), lambda g: dict(
        lr=g["lr"], weight_decay=g["weight_decay"]),
        fixed=dict(momentum_form="paper", trust_norm="update", fallback_on="zero_denominator", eta=trust_coefficient,
                   epsilon=eps, momentum=momentum, nesterov=nesterov),
        rule=rule, needs_names=named)


def mlperf(params: Iterable[Any], learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0001,
           eeta: float = 0.001, epsilon: float = 0.0, name: str = "LARSOptimizer", skip_list: Iterable[str] | None = None,
           use_nesterov: bool = False) -> LARS:
    """The MLPerf TF2 reference ``LARSOptimizer`` (mlcommons/training resnet-tf2 ``lars_optimizer.py``):
    ``mom = mu * mom - lr * ratio * (g + wd w); w += mom``; a param whose name contains an entry of
    ``skip_list`` gets neither the ratio nor weight decay; weight decay is added even where the ratio
    falls back to 1. Its ``epsilon or 1e-7``: the documented 0.0 runs as Keras's 1e-7."""
    skips = list(skip_list or ())

    def rule(param_name: str | None, tensor: Tensor, g: dict[str, Any]) -> dict[str, Any]:
        return _plain(not any(skip in param_name for skip in skips))

    return _build(params, "mlperf", dict(lr=learning_rate, weight_decay=weight_decay), lambda g: dict(
        lr=g["lr"], weight_decay=g["weight_decay"]),
        fixed=dict(momentum_form="paper", trust_norm="sum", momentum=momentum, eta=eeta, epsilon=epsilon or 1e-7,
                   nesterov=use_nesterov),
        rule=rule if skips else None, needs_names=True)


def ssl(params: Iterable[Any], lr: float, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001,
        weight_decay_filter: bool = False, lars_adaptation_filter: bool = False) -> LARS:
    """The FAIR Barlow Twins / VICReg ``LARS``: u = g + wd w, ratio eta |w| / |u| (no epsilon; 1 where
    |w| or |u| is 0), ``b = mu b + ratio * u; w -= lr b``. The per-group ``weight_decay_filter`` /
    ``lars_adaptation_filter`` (True) keep 1-D tensors (biases, norm layers) out of weight decay /
    the trust ratio."""
    defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                    weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)

    def rule(name: str | None, tensor: Tensor, g: dict[str, Any]) -> dict[str, Any]:
        filtered = tensor.ndim == 1
        overrides: dict[str, Any] = {}
        if g["weight_decay_filter"] and filtered:
            overrides["weight_decay"] = 0.0
        if g["lars_adaptation_filter"] and filtered:
            overrides["lars"] = False
        return overrides

    return _build(params, "ssl", defaults, lambda g: dict(
        lr=g["lr"], weight_decay=g["weight_decay"], momentum=g["momentum"], eta=g["eta"]),
        fixed=dict(momentum_form="torch", trust_norm="update", epsilon=0.0, fallback_on="zero_denominator"),
        rule=rule)


def mxnet(params: Iterable[Any], learning_rate: float = 0.1, momentum: float = 0.0, eta: float = 0.001,
          epsilon: float = 1e-8, wd: float = 0.0, rescale_grad: float = 1.0, clip_gradient: float | None = None,
          multi_precision: bool = False) -> LARS:
    """MXNet 2.0's ``mxnet.optimizer.LARS`` on torch params: lr inside the momentum, names ending in
    ``gamma``, ``beta`` or ``bias`` skip the trust ratio (and keep weight decay), ``rescale_grad``
    inside the norm, ``clip_gradient`` after it (None or negative: off). Names come from
    ``(name, tensor)`` pairs. For MXNet's own API (indices, updaters, schedulers) see
    :mod:`larsopt.mxnet`."""
    clip = clip_gradient if clip_gradient is not None and clip_gradient >= 0 else None

    def rule(name: str | None, tensor: Tensor, g: dict[str, Any]) -> dict[str, Any]:
        return {} if not name.endswith(("gamma", "beta", "bias")) else {"lars": False}

    return _build(params, "mxnet", dict(lr=learning_rate, weight_decay=wd), lambda g: dict(
        lr=g["lr"], weight_decay=g["weight_decay"]),
        fixed=dict(momentum_form="paper", trust_norm="sum", momentum=momentum, eta=eta, epsilon=epsilon,
                   rescale_grad=rescale_grad, clip_gradient=clip, multi_precision=multi_precision),
        rule=rule, needs_names=True)
