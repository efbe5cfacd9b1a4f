"""The options of a LARS step, each declared once: name, default, allowed values, validation, doc.

:class:`LarsOptions` holds the hyper-parameters and switches the formula reads; every front-end
builds one (``LARS`` once per param group per step, the MXNet API once per call) and every
implementation in ``larsopt._impl`` reads it. :data:`OPTIMIZER_SETTINGS` are the param-group keys
of ``larsopt.LARS`` that choose how a step is stored and run rather than what it computes.

Adding an option is one field here (with its default, doc and check) plus the code that uses it
in ``_impl/reference.py``; a fast path that does not declare it in its ``SUPPORTED`` table hands
every tensor of a group that sets it to the next path (``docs/adding-an-option.md``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from numpy import bool_ as np_bool
from torch import Tensor

MOMENTUM_FORMS = ("paper", "torch")
BUFFER_STARTS = ("update", "zeros")
ADAPT_WHEN = ("always", "weight_decay")
FALLBACKS = ("ratio_one", "plain_step")
FALLBACK_ON = ("zero_norm", "zero_denominator")
TRUST_NORMS = ("sum", "update")
NORM_SOURCES = ("master", "param")
IMPLS = ("auto", "reference", "foreach", "fused")


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type. A ``TypeError``, as Python raises for one; also a ``ValueError``,
    which every bad option raised before types and values were told apart."""


def _is_number(value: Any) -> bool:
    """A real number: Python's, NumPy's (``np.float32(0.1)``, ``np.int64(1)``) or any ``numbers.Real``."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool))


def _number_or_type_error(name: str, value: Any, expected: str) -> None:
    if not _is_number(value):
        raise OptionTypeError(f"Invalid {name}: {value!r} is a {type(value).__name__}; expected {expected}")


def plain_numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with NumPy (and other ``numbers.Real``) scalars turned into Python floats and ints, as
    torch's own optimizers store them, so that no NumPy scalar meets a tensor in a step."""
    return {key: (int(value) if isinstance(value, numbers.Integral) else float(value))
            if _is_number(value) and type(value) not in (int, float) else value for key, value in values.items()}


def _nonnegative(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point:
            raise ValueError(f"Invalid {name}: a tensor {name} must be a 0-d floating tensor, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        # (a tensor on an accelerator is not read back: that would synchronise)
        if value.device.type == "cpu":
            number = value.item()
            if not (number >= 0 and math.isfinite(number)):
                raise ValueError(f"Invalid {name}: {number!r}; expected a finite number >= 0")
        return
    _number_or_type_error(name, value, "a finite number >= 0")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number >= 0")


def _is_zero(value: float | Tensor) -> bool:
    return bool(value == 0)  # (a tensor weight_decay is read here: it must be on the CPU to avoid a sync)


def _momentum(name: str, value: Any) -> None:
    _number_or_type_error(name, value, "a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in [0, 1)")


def _dampening(name: str, value: Any) -> None:
    _number_or_type_error(name, value, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in [0, 1]")


def _finite(name: str, value: Any) -> None:
    _number_or_type_error(name, value, "a finite number")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number")


def _clip(name: str, value: Any) -> None:
    if value is None:
        return
    _number_or_type_error(name, value, "None (no clipping) or a number >= 0")
    if not value >= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected None (no clipping) or a number >= 0")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionTypeError(f"Invalid {name}: {value!r}; expected True or False")


def _dtype_or_none(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise OptionTypeError(f"Invalid {name}: {value!r}; expected None or a floating torch.dtype")


def _one_of(allowed: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return check


@dataclass(frozen=True)
class Option:
    """One option's declaration (kept as the metadata of its :class:`LarsOptions` field)."""

    doc: str
    check: Callable[[str, Any], None]
    #: The key of ``larsopt.LARS``'s param groups (and constructor) for it: ``""`` for the option's
    #: own name; ``None``: only front-ends that need it set it, through :func:`larsopt.functional.lars`.
    group_key: str | None
    #: Whether a saved ``LARS.state_dict`` must hold it (the options of the first release): a
    #: group lacking one is from another optimizer. Options added later take their default.
    saved_since_first_release: bool


def _option(default: Any, doc: str, check: Callable[[str, Any], None], *, group_key: str | None = "",
            saved_since_first_release: bool = False) -> Any:
    return dataclasses.field(default=default, metadata={"option": Option(
        doc, check, group_key, saved_since_first_release)})


@dataclass(frozen=True)
class LarsOptions:
    """The hyper-parameters and switches of one LARS step (formulas in :mod:`larsopt.functional`)."""

    # The options of the first release: a saved state must hold them.
    lr: float | Tensor = _option(0.1, "learning rate: a float or a 0-d floating tensor (a tensor changes without "
                                      "a recompile or a host sync)", _nonnegative, saved_since_first_release=True)
    momentum: float = _option(0.0, "momentum mu in [0, 1); 0 keeps no momentum buffer", _momentum,
                              saved_since_first_release=True)
    eta: float = _option(0.001, "trust coefficient", _nonnegative, saved_since_first_release=True)
    epsilon: float = _option(1e-8, "added to the trust-ratio denominator", _nonnegative,
                             saved_since_first_release=True)
    weight_decay: float = _option(0.0, "L2 coefficient wd, added to the gradient (coupled, as in the paper)",
                                  _nonnegative, saved_since_first_release=True)
    adapt: bool = _option(True, "apply the trust ratio (False: lam = 1, e.g. biases and norm layers; weight decay "
                                "still applies)", _boolean, group_key="lars", saved_since_first_release=True)
    nesterov: bool = _option(False, "Nesterov momentum (needs momentum > 0)", _boolean,
                             saved_since_first_release=True)
    momentum_form: str = _option("paper", "'paper' (lr inside the buffer: LARS, MXNet, MLPerf) or 'torch' (lr "
                                          "outside: torch SGD, timm, LARC)", _one_of(MOMENTUM_FORMS),
                                 saved_since_first_release=True)
    trust_norm: str = _option("sum", "trust-ratio denominator: 'sum' |g| + wd |w| or 'update' |g + wd w|",
                              _one_of(TRUST_NORMS), saved_since_first_release=True)
    trust_clip: bool = _option(False, "LARC clip mode: the step size is min(lr * lam, lr)", _boolean,
                               saved_since_first_release=True)
    rescale_grad: float = _option(1.0, "gradient multiplier, inside the trust-ratio norm (MXNet)", _finite,
                                  saved_since_first_release=True)
    clip_gradient: float | None = _option(None, "element-wise clip of the rescaled gradient after the norm, before "
                                                "weight decay (None: off)", _clip, saved_since_first_release=True)
    maximize: bool = _option(False, "maximise the objective instead of minimising it", _boolean,
                             saved_since_first_release=True)
    norm_source: str = _option("master", "with master copies, take |w| from the 'master' or from the 'param' as "
                                         "stored (MXNet's fused path)", _one_of(NORM_SOURCES),
                               saved_since_first_release=True)
    math_dtype: torch.dtype | None = _option(None, "dtype of the update arithmetic (None: the param dtype, at least "
                                                   "float32); MXNet's float16 kernels without masters use float16",
                                             _dtype_or_none, group_key=None)
    lazy_update: bool = _option(True, "sparse gradients: True changes only the rows present, False gives the dense "
                                      "result", _boolean, saved_since_first_release=True)
    stochastic_rounding: bool = _option(False, "write bfloat16 params without a master back with unbiased "
                                               "stochastic rounding", _boolean, saved_since_first_release=True)
    # Added later: a state saved before them loads with their defaults.
    dampening: float = _option(0.0, "momentum dampening d in [0, 1]: the buffer takes (1 - d) of each update "
                                    "(torch SGD)", _dampening)
    buffer_start: str = _option("update", "a first step's momentum buffer: 'update' (the update itself, undampened: "
                                          "torch SGD, timm, Bolts, LARC) or 'zeros' (dampened from the first step: "
                                          "pytorch-optimizer); the same without dampening", _one_of(BUFFER_STARTS))
    adapt_when: str = _option("always", "'always', or 'weight_decay': the trust ratio applies only while the group's "
                                        "weight_decay != 0 (timm without always_adapt, Bolts)", _one_of(ADAPT_WHEN))
    fallback: str = _option("ratio_one", "a tensor whose trust ratio falls back: 'ratio_one' (lam = 1, clipped under "
                                         "trust_clip, weight decay kept: MXNet, timm, MLPerf, optax) or 'plain_step' "
                                         "(its plain gradient step: no weight decay, no clip: Bolts, apex LARC)",
                            _one_of(FALLBACKS))
    fallback_on: str = _option("zero_norm", "when the ratio falls back: 'zero_norm' (|w| or |g| is 0, or |g + wd w| "
                                            "for trust_norm='update': MXNet) or 'zero_denominator' (|w| is 0 or the "
                                            "denominator without epsilon is 0: pytorch-optimizer, optax, FAIR SSL); "
                                            "always when a norm is not finite", _one_of(FALLBACK_ON))
    momentum_correction: bool = _option(False, "scale the momentum by lr / the previous step's lr, so a changing lr "
                                               "does not rescale past steps (MXNet 1.x, MLPerf MXNet); the step "
                                               "needs previous_lr, which LARS keeps per group", _boolean)

    def check(self, names: Mapping[str, str] | None = None) -> LarsOptions:
        """Raise ``ValueError`` naming the first bad option (as ``names`` spells it, if given); return
        ``self``."""
        for field in dataclasses.fields(self):
            field.metadata["option"].check(names.get(field.name, field.name) if names else field.name,
                                           getattr(self, field.name))
        if self.nesterov and self.momentum == 0:
            raise ValueError("Invalid nesterov: True with momentum=0; Nesterov momentum needs momentum > 0")
        return self

    def effective(self) -> LarsOptions:
        """These options with the rules that depend on other options' current values applied (the
        step calls it, so a group whose weight_decay a schedule changes follows at once)."""
        if self.adapt_when == "weight_decay" and self.adapt and _is_zero(self.weight_decay):
            return dataclasses.replace(self, adapt=False, adapt_when="always")
        return self

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> LarsOptions:
        """The options of a ``larsopt.LARS`` param group (not checked: groups are checked when added)."""
        return cls(**{name: group[key] for name, key in _GROUP_KEYS.items()})

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> LarsOptions:
        """Checked options from :func:`larsopt.functional.lars`'s keywords; unknown names raise ``TypeError``.
        (Not checked while torch.compile traces: the values were checked by the eager calls.)"""
        unknown = sorted(set(keywords) - set(_FIELDS))
        if unknown:
            raise TypeError(f"Unknown LARS option(s) {unknown}; the options are {sorted(_FIELDS)}")
        options = cls(**keywords)
        return options if torch.compiler.is_compiling() else options.check()


_FIELDS: dict[str, Option] = {field.name: field.metadata["option"] for field in dataclasses.fields(LarsOptions)}

#: option name -> param-group key, for the options ``larsopt.LARS`` exposes
_GROUP_KEYS: dict[str, str] = {name: option.group_key or name for name, option in _FIELDS.items()
                               if option.group_key is not None}

#: The defaults of every option, by name.
DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(LarsOptions)}


@dataclass(frozen=True)
class Setting:
    """A param-group key of ``larsopt.LARS`` that is not a step option."""

    default: Any
    doc: str
    check: Callable[[str, Any], None]


#: ``larsopt.LARS`` settings kept by the optimizer itself (``load_state_dict`` keeps this optimizer's).
OPTIMIZER_SETTINGS: dict[str, Setting] = {
    "impl": Setting("auto", "implementation: 'auto' (= 'fused'), 'fused', 'foreach' or 'reference'", _one_of(IMPLS)),
    "multi_precision": Setting(False, "float32 master copies and momentum for float16/bfloat16 params", _boolean),
    "capturable": Setting(False, "the step will be captured in a CUDA graph (needs lr as a 0-d tensor)", _boolean),
    "telemetry": Setting(False, "keep each param's |w|, |g| and trust ratio of the last step (LARS.telemetry())",
                         _boolean),
    "carry_weight_norms": Setting(False, "reuse each large param's |w|^2 from the previous step's update (fused CPU "
                                  "kernel; same numbers, less memory traffic) while nothing wrote the param outside "
                                  "its version counter (p.data)", _boolean),
}


def group_defaults(**values: Any) -> dict[str, Any]:
    """``larsopt.LARS``'s param-group defaults: every exposed option and setting, ``values`` over the
    declared defaults."""
    defaults = {key: DEFAULTS[name] for name, key in _GROUP_KEYS.items()}
    defaults.update({key: setting.default for key, setting in OPTIMIZER_SETTINGS.items()})
    defaults.update(values)
    return defaults


def check_group(group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first bad value of a ``larsopt.LARS`` param group."""
    LarsOptions.from_group(group).check(_GROUP_KEYS)
    for key, setting in OPTIMIZER_SETTINGS.items():
        setting.check(key, group[key])
    if group["capturable"] and not isinstance(group["lr"], Tensor):
        raise ValueError(f"Invalid lr: {group['lr']!r} with capturable=True; a CUDA graph would keep a Python lr at "
                         "its captured value: pass lr as a 0-d tensor on the params' device (LR schedulers update "
                         "it in place)")


def group_keys_saved_since_first_release() -> set[str]:
    """The param-group keys every saved ``larsopt.LARS`` state holds."""
    return {key for name, key in _GROUP_KEYS.items() if _FIELDS[name].saved_since_first_release}


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: In a path's ``SUPPORTED`` table: every value of the option (``None`` is a value, of clip_gradient).
ANY = _Any()

_RESTRICTIONS: dict[int, tuple[Mapping[str, Any], list[tuple[str, tuple[Any, ...]]]]] = {}


def _restrictions(supported: Mapping[str, tuple[Any, ...] | _Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """(option, values it may take) for every option ``supported`` limits, an option it does not list
    being limited to its default. Worked out once per table (and afresh while dynamo traces: a
    look-up in the cache would become a guard on its contents, which the first call changes)."""
    if torch.compiler.is_compiling():
        return _limits(supported)
    cached = _RESTRICTIONS.get(id(supported))
    if cached is None or cached[0] is not supported:
        cached = _RESTRICTIONS[id(supported)] = (supported, _limits(supported))
    return cached[1]


def _limits(supported: Mapping[str, tuple[Any, ...] | _Any]) -> list[tuple[str, tuple[Any, ...]]]:
    return [(name, (DEFAULTS[name],) if name not in supported else supported[name])
            for name in DEFAULTS if supported.get(name) is not ANY]


def unsupported(options: LarsOptions, supported: Mapping[str, tuple[Any, ...] | _Any]) -> str | None:
    """The name of the first option of ``options`` whose value a path's ``supported`` table does not
    list (an option missing from the table is implemented only at its default), or ``None``.

    A path's table maps option name -> the values it computes exactly like the reference, or
    :data:`ANY`. Tables are written out by hand, so an option added later is never implemented by a
    fast path until its table says so."""
    for name, allowed in _restrictions(supported):
        value = getattr(options, name)
        if not any(value is choice or (not isinstance(value, Tensor) and value == choice) for choice in allowed):
            return name
    return None
