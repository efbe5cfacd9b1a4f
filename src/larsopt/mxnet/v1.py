r"""MXNet 1.x's LARS API (``mxnet.optimizer.LARS`` of MXNet 1.6.0 through 1.9.1) on torch tensors.

.. code-block:: python

    from larsopt.mxnet import v1

    opt = v1.LARS(learning_rate=0.1, momentum=0.9, wd=1e-4, eta=0.001,
                  param_idx2name={0: "fc_weight", 1: "fc_bias"})   # or v1.create("lars", ...)
    updater = v1.get_updater(opt)
    updater([0, 1], [w.grad for w in weights], weights)           # weights updated in place

What differs from MXNet 2.0's class (:class:`larsopt.mxnet.LARS`):

* ``LARS(momentum=0.0, lazy_update=True, eta=0.001, eps=0, momentum_correction=True, **kwargs)``,
  with MXNet 1.x's base keywords: ``learning_rate`` defaults to ``None`` (0.01 without a
  scheduler, a scheduler's ``base_lr`` kept otherwise); there is no ``aggregate_num`` or
  ``use_fused_step`` keyword: the :class:`Updater` passes chunks of
  ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` weights (read at construction, default 4).
* Momentum correction: each ``update()`` call uses ``momentum * cur_lr / last_lr``, where
  ``cur_lr`` is the global lr of this call and ``last_lr`` that of the previous call (off when
  ``momentum_correction=False`` or ``last_lr == 0``). It is tracked per call, not per step: of
  the several calls an Updater makes per step (chunks, dtypes, one per weight), only the first
  after an lr change sees the ratio, as in MXNet 1.x.
* ``clip_gradient`` 0 or ``None`` means no clipping (so does a negative value).
* Weight decay: every name in ``param_idx2name`` not ending in ``_weight`` gets ``wd_mult`` 0,
  at construction and on each :meth:`~LARS.set_wd_mult` (``param_dict`` still takes priority).
* Under ``multi_precision`` a float16 weight's state is ``(momentum, master_fp32)``.

The rest, the formula included, is MXNet 2.0's (``larsopt.mxnet``): trust ratio
``eta * |w| / (|rescale_grad * g| + wd_i * |w| + eps)`` (1 if a norm is 0 or not finite, or the
name ends in gamma/beta/bias), ``mom = mu * mom - lr_i * lam * (clip(rescale_grad * g) + wd_i * w)``,
``w += mom``. See ``docs/mxnet-compatibility.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Callable

import torch

from larsopt.mxnet import _arrays, _checks, _step, lr_scheduler, optimizer
from larsopt.mxnet.errors import MXNetAssertionError
from larsopt.mxnet.lars import uses_trust_ratio
from larsopt.mxnet.optimizer import Index, as_lists
from larsopt.mxnet.updater import Updater, get_updater
from larsopt.options import LarsOptions

__all__ = ["AGGREGATION_SIZE_VARIABLE", "LARS", "MXNetAssertionError", "Optimizer", "Updater", "create", "get_updater",
           "lr_scheduler", "register"]

#: The environment variable MXNet 1.x's LARS reads its aggregation size from, at construction.
AGGREGATION_SIZE_VARIABLE = "MXNET_OPTIMIZER_AGGREGATION_SIZE"
DEFAULT_AGGREGATION_SIZE = 4

_TWO_O_FRONT_END = "For MXNet 2.0 numbers use larsopt.mxnet.LARS."


class Optimizer(optimizer.Optimizer):
    """MXNet 1.x's ``mxnet.optimizer.Optimizer`` base class (bookkeeping shared with MXNet 2.0's).

    Args:
        rescale_grad, param_idx2name, wd, clip_gradient, learning_rate, lr_scheduler, sym,
        begin_num_update, multi_precision, param_dict: as in :class:`larsopt.mxnet.Optimizer`.

    MXNet 1.x's base class differs from 2.0's in that it has no ``aggregate_num`` or
    ``use_fused_step`` keyword (a ``TypeError`` naming it) and in its weight-decay default: every
    name in ``param_idx2name`` not ending in one of :attr:`wd_exempt_suffixes` gets
    ``wd_mult`` 0 (``_weight`` and ``_gamma`` here; LARS keeps only ``_weight``).
    """

    opt_registry: dict[str, type[optimizer.Optimizer]] = {}
    legacy_kwarg_hints = {
        "aggregate_num": "`aggregate_num` is an MXNet 2.0 keyword; MXNet 1.x's LARS takes its aggregation size "
                         f"from the {AGGREGATION_SIZE_VARIABLE} environment variable (default "
                         f"{DEFAULT_AGGREGATION_SIZE}), read at construction. " + _TWO_O_FRONT_END,
        "use_fused_step": "`use_fused_step` is an MXNet 2.0 keyword; MXNet 1.x's LARS has one update path. "
                          + _TWO_O_FRONT_END,
    }
    #: Names (values of ``param_idx2name``) ending in these keep their weight decay by default.
    wd_exempt_suffixes: tuple[str, ...] = ("_weight", "_gamma")

    def __init__(
        self,
        rescale_grad: float = 1.0,
        param_idx2name: dict[Index, str] | None = None,
        wd: float = 0.0,
        clip_gradient: float | None = None,
        learning_rate: float | None = None,
        lr_scheduler: Callable[[int], float] | None = None,
        sym: Any = None,
        begin_num_update: int = 0,
        multi_precision: bool = False,
        param_dict: dict[Index, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            self._reject_kwargs(kwargs)
        # Both checks happen before the base class stores anything, whose last act is set_wd_mult.
        if isinstance(param_idx2name, dict):
            for index, name in param_idx2name.items():
                if not isinstance(name, str):
                    raise TypeError(f"param_idx2name[{index!r}] must be a str name, got {name!r} of type "
                                    f"{type(name).__name__}")
        super().__init__(rescale_grad=rescale_grad, param_idx2name=param_idx2name, wd=wd,
                         clip_gradient=clip_gradient, learning_rate=learning_rate, lr_scheduler=lr_scheduler,
                         sym=sym, begin_num_update=begin_num_update, multi_precision=multi_precision,
                         param_dict=param_dict)

    def set_wd_mult(self, args_wd_mult: dict[Index, float]) -> None:
        """Replace the wd multipliers: 0 for every name in ``param_idx2name`` not ending in
        :attr:`wd_exempt_suffixes`, then ``sym``'s ``__wd_mult__`` by name, then ``args_wd_mult``
        (keys are indices or names)."""
        self._check_mults("set_wd_mult", args_wd_mult)
        self.wd_mult = {name: 0.0 for name in self.idx2name.values() if not name.endswith(self.wd_exempt_suffixes)}
        self.wd_mult.update(self._symbol_mults("__wd_mult__"))
        self.wd_mult.update(args_wd_mult)

    def _set_current_context(self, device_id: int) -> None:
        """Select the update counters of device ``device_id`` (MXNet 1.x's name)."""
        self._set_current_device(device_id)


register = Optimizer.register
create = Optimizer.create_optimizer


def aggregation_size() -> int:
    """``MXNET_OPTIMIZER_AGGREGATION_SIZE`` as an int >= 1 (default 4).

    MXNet 1.x fails on every dense update with 0 (a zero-size chunk), so 0 is refused here.
    """
    text = os.environ.get(AGGREGATION_SIZE_VARIABLE, str(DEFAULT_AGGREGATION_SIZE))
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"{AGGREGATION_SIZE_VARIABLE}={text!r} is not an int; MXNet 1.x's LARS reads the number "
                         "of weights per update call from it (an int >= 1, default 4)") from None
    if size < 1:
        raise ValueError(f"{AGGREGATION_SIZE_VARIABLE}={text!r}: the number of weights per update call must be an "
                         "int >= 1 (MXNet 1.x's dense update fails with 0)")
    return size


@register
class LARS(Optimizer):
    """Layer-wise adaptive rate scaling exactly as MXNet 1.x's ``mxnet.optimizer.LARS`` (1.6-1.9).

    Args:
        momentum: heavy-ball momentum with the lr inside the buffer; a state exists iff
            ``momentum != 0``, and momentum is applied when ``momentum > 0``.
        lazy_update: for row-sparse gradients (torch sparse COO with ``sparse_dim == 1``): only
            the rows present change (weight, momentum and weight decay); ``False`` gives the
            dense result. Weights with a float32 master (``multi_precision``) always get the
            dense result, as MXNet's dense-only multi-precision kernels.
        eta: the LARS coefficient. eps: added to the trust-ratio denominator (default 0).
        momentum_correction: scale the momentum of an update call by ``cur_lr / last_lr``, the
            global lr of this call over that of the previous call (tracked per call: see the
            module docstring).
        **kwargs: the base-class keywords of :class:`Optimizer` (``learning_rate`` defaults to
            ``None``: 0.01 without a scheduler).

    Raises:
        TypeError: for an unknown keyword, naming it (MXNet 2.0 names say what 1.x calls them),
            or a hyper-parameter of the wrong type.
        ValueError: for a NaN or infinite hyper-parameter, or a bad
            ``MXNET_OPTIMIZER_AGGREGATION_SIZE``.
    """

    legacy_kwarg_hints = {
        **Optimizer.legacy_kwarg_hints,
        "epsilon": "`epsilon` is MXNet 2.0's name; MXNet 1.x's LARS calls it `eps` (default 0). " + _TWO_O_FRONT_END,
        "lars_eta": "`lars_eta` is a name from MXNet 1.x's docstring; the argument is `eta`.",
        "lars_epsilon": "`lars_epsilon` is a name from MXNet 1.x's docstring; the argument is `eps`.",
    }
    wd_exempt_suffixes = ("_weight",)

    def __init__(
        self,
        momentum: float = 0.0,
        lazy_update: bool = True,
        eta: float = 0.001,
        eps: float = 0,
        momentum_correction: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("momentum", momentum), ("eta", eta), ("eps", eps)):
            _checks.real(name, value)
        _checks.boolean("lazy_update", lazy_update)
        _checks.boolean("momentum_correction", momentum_correction)
        self.momentum = momentum
        self.momentum_correction = momentum_correction
        self.lazy_update = lazy_update
        self.aggregate_num = aggregation_size()
        self.eta = eta
        self.eps = eps
        #: The global lr of the previous and of the latest update call (None before the first).
        self.last_lr: float | None = None
        self.cur_lr: float | None = None

    def _get_lrs(self, indices: Sequence[Index]) -> list[float]:
        """The lr of each index, recording the call's global lr for the momentum correction
        (``last_lr`` takes the previous call's, or this call's on the first call)."""
        if self.cur_lr is not None:
            self.last_lr = self.cur_lr
        lr = self._base_lr()
        if self.cur_lr is None:
            self.last_lr = lr
        self.cur_lr = lr
        return self._lrs_from(lr, indices)

    def corrected_momentum(self) -> float:
        """The momentum of the latest update call: ``momentum * cur_lr / last_lr`` with
        ``momentum_correction`` (unless ``last_lr`` is 0 or no call was made), else ``momentum``."""
        if self.momentum_correction and self.last_lr is not None and self.last_lr != 0:
            return self.momentum * (self.cur_lr / self.last_lr)
        return self.momentum

    def uses_trust_ratio(self, index: Index) -> bool:
        """Whether ``index`` gets the trust ratio: not if its name (``idx2name``, else
        ``str(index)``) ends in gamma, beta or bias (plain ``str.endswith``, as MXNet)."""
        return uses_trust_ratio(self.idx2name, index)

    def create_state(self, index: Index, weight: _arrays.ArrayLike) -> _arrays.ArrayLike | None:
        """The momentum buffer (zeros like ``weight``), or ``None`` when ``momentum == 0``."""
        _arrays.check_floating(weight, f"weight of index {index!r}")
        if self.momentum == 0.0:
            return None
        return _arrays.zeros_like(weight)

    def create_state_multi_precision(self, index: Index, weight: _arrays.ArrayLike) -> Any:
        """:meth:`create_state`, or for a float16 weight under ``multi_precision`` MXNet 1.x's pair
        ``(momentum or None, master_fp32)`` (2.0 has the other order); warns for float16 without
        ``multi_precision``."""
        state = super().create_state_multi_precision(index, weight)
        if self.multi_precision and _arrays.torch_dtype(weight) == torch.float16:
            master, momentum = state
            return (momentum, master)
        return state

    def update(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """Update the weights in place, in one call: all indices count, then one scheduler call,
        then one momentum correction for the whole call.

        Takes lists (or tuples) of indices, weights, grads and states, or one of each; the states
        of :meth:`create_state_multi_precision`.
        """
        indices, weights, grads, states = as_lists(indices, weights, grads, states)
        members = [_step.resolve(*arrays, multi_precision=self.multi_precision, pair=("momentum", "master"))
                   for arrays in zip(indices, weights, grads, states)]  # before counting: a bad call changes nothing
        self._update_count(indices)
        lrs = self._get_lrs(indices)
        wds = self._get_wds(indices)
        momentum = self.corrected_momentum() if self.momentum > 0 else 0.0
        # MXNet 1.x passes clip_gradient when it is truthy, and its kernels clip iff it is >= 0.
        clip = float(self.clip_gradient) if self.clip_gradient and self.clip_gradient > 0 else None
        options = [
            LarsOptions(
                lr=float(lr),
                weight_decay=float(wd),
                momentum=float(momentum) if member.momentum_buffer is not None else 0.0,
                eta=float(self.eta),
                epsilon=float(self.eps),
                adapt=self.uses_trust_ratio(index),
                momentum_form="paper",
                trust_norm="sum",
                rescale_grad=float(self.rescale_grad),
                clip_gradient=clip,
                norm_source="param",
                math_dtype=member.math_dtype,
                lazy_update=bool(self.lazy_update) and member.master is None,
            )
            for index, member, lr, wd in zip(indices, members, lrs, wds)
        ]
        _step.run(members, options, check=_check_with_corrected_momentum)
        if self.momentum > 0 and momentum == 0:
            # The corrected momentum is 0 when the lr dropped to 0: MXNet's kernel then writes
            # mom = 0 * mom - 0 * g' = 0, while the core leaves a buffer it does not use alone.
            for member in members:
                if member.momentum_buffer is not None:
                    member.momentum_buffer.zero_()

    def update_multi_precision(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """:meth:`update` (which handles the states of :meth:`create_state_multi_precision`)."""
        self.update(indices, weights, grads, states)


def _check_with_corrected_momentum(options: LarsOptions) -> LarsOptions:
    """Check ``options`` as the core does, except that the momentum may reach 1 or more.

    The user's momentum was checked at construction; ``momentum * cur_lr / last_lr`` exceeds it
    while the lr rises (warm-up), which MXNet 1.x computes as is.
    """
    if not (math.isfinite(options.momentum) and options.momentum >= 0):
        raise ValueError(f"Invalid momentum: the corrected momentum momentum * cur_lr / last_lr is "
                         f"{options.momentum!r}; it must be a finite number >= 0 (is an lr negative?)")
    dataclasses.replace(options, momentum=0.0).check()
    return options
