r"""MXNet 2.0's ``mxnet.optimizer.LARS`` on torch tensors (and numpy arrays).

This module resolves MXNet's bookkeeping (counters, scheduler, multipliers, names, states,
multi_precision) into lists and calls :func:`larsopt.functional.lars` with
``momentum_form="paper"`` and ``trust_norm="sum"``; the formula lives there:

.. code-block:: text

    lam = eta * |w| / (|rescale_grad * g| + wd_i * |w| + epsilon)     (1 if a norm is 0 or not finite,
                                                                        or the name ends in gamma/beta/bias)
    g'  = clip(rescale_grad * g, -clip_gradient, clip_gradient) + wd_i * w
    mom = momentum * mom - lr_i * lam * g';   w += mom                  (w -= lr_i * lam * g' without state)

Where MXNet's paths disagree because of bugs, this class does one thing on every path; see
``docs/mxnet-compatibility.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from larsopt.mxnet import _arrays, _checks, _step
from larsopt.mxnet.errors import MXNetAssertionError
from larsopt.mxnet.optimizer import Index, Optimizer, as_lists, register
from larsopt.options import LarsOptions

#: Name suffixes that MXNet's LARS exempts from the trust ratio (their weight decay stays).
EXCLUDED_NAME_SUFFIXES = ("gamma", "beta", "bias")

_ONE_X_FRONT_END = ("For MXNet 1.x numbers (eps=0 by default, momentum correction, lazy_update=True by "
                    "default) use larsopt.mxnet.v1.LARS, not this MXNet 2.0 class.")


def uses_trust_ratio(idx2name: dict[Index, str], index: Index) -> bool:
    """Whether ``index`` gets the trust ratio: not if its name (``idx2name``, else ``str(index)``)
    ends in gamma, beta or bias (plain ``str.endswith``, as MXNet 1.x and 2.0)."""
    name = idx2name[index] if index in idx2name else str(index)
    return not name.endswith(EXCLUDED_NAME_SUFFIXES)


@register
class LARS(Optimizer):
    """Layer-wise adaptive rate scaling exactly as MXNet 2.0's ``mxnet.optimizer.LARS``.

    Args:
        learning_rate: global lr (default 0.1, which overwrites a scheduler's ``base_lr``
            unless ``None`` is passed, as in MXNet).
        momentum: heavy-ball momentum with the lr inside the buffer; a state exists iff
            ``momentum != 0``. Momentum is applied when ``momentum > 0``.
        eta: the LARS coefficient. epsilon: added to the trust-ratio denominator.
        lazy_update: for row-sparse gradients (torch sparse COO with ``sparse_dim == 1``) on the
            fused path: only the rows present change (weight, momentum and weight decay).
            ``False`` gives the dense result.
        use_fused_step: ``update`` calls ``fused_step`` (True) or ``step`` (False). The two
            differ, as in MXNet, only in how the counters advance within a call and in the
            source of ``|w|`` under ``multi_precision``: the float32 master for ``step``, the
            float16 weight for ``fused_step``.
        aggregate_num: weights per :class:`~larsopt.mxnet.Updater` call (``numpy.inf``: all).
        **kwargs: the base-class keywords of :class:`~larsopt.mxnet.Optimizer` (``wd``,
            ``rescale_grad``, ``clip_gradient``, ``lr_scheduler``, ``param_idx2name``,
            ``param_dict``, ``sym``, ``begin_num_update``, ``multi_precision``).

    Raises:
        MXNetAssertionError: (a ``ValueError`` and an ``AssertionError``) for MXNet's two asserts:
            ``lazy_update`` with ``use_fused_step=False`` or with ``multi_precision``.
        TypeError: for an unknown keyword, naming it (MXNet 1.x names get a pointer to the 2.0 name).
    """

    legacy_kwarg_hints = {
        "eps": "`eps` is the MXNet 1.x name; MXNet 2.0's LARS calls it `epsilon` (default 1e-8, where 1.x "
               "defaulted eps to 0). " + _ONE_X_FRONT_END,
        "lars_eta": "`lars_eta` is a name from MXNet 1.x's docstring; the argument is `eta`. " + _ONE_X_FRONT_END,
        "lars_epsilon": "`lars_epsilon` is a name from MXNet 1.x's docstring; MXNet 2.0's argument is "
                        "`epsilon`. " + _ONE_X_FRONT_END,
        "momentum_correction": "momentum correction (momentum scaled by lr_t / lr_(t-1)) is MXNet 1.x "
                               "behaviour; MXNet 2.0's LARS has none and no such argument. " + _ONE_X_FRONT_END,
    }

    def __init__(
        self,
        learning_rate: float | None = 0.1,
        momentum: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 1e-08,
        lazy_update: bool = False,
        use_fused_step: bool | None = True,
        aggregate_num: int | float | None = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, use_fused_step=use_fused_step,
                         aggregate_num=aggregate_num, **kwargs)
        for name, value in (("momentum", momentum), ("eta", eta), ("epsilon", epsilon)):
            _checks.real(name, value)
        _checks.boolean("lazy_update", lazy_update)
        if not self.use_fused_step and lazy_update:
            raise MXNetAssertionError("When use_fused_step is set to False, lazy_update has to be turned off.")
        if lazy_update and self.multi_precision:
            raise MXNetAssertionError("When lazy_update is set to True, multi_precision has be turned off.")
        self.lazy_update = lazy_update
        self.momentum = momentum
        self.eta = eta
        self.epsilon = epsilon

    def create_state(self, index: Index, weight: _arrays.ArrayLike) -> _arrays.ArrayLike | None:
        """The momentum buffer (zeros like ``weight``), or ``None`` when ``momentum == 0``."""
        _arrays.check_floating(weight, f"weight of index {index!r}")
        if self.momentum == 0.0:
            return None
        return _arrays.zeros_like(weight)

    def uses_trust_ratio(self, index: Index) -> bool:
        """Whether ``index`` gets the trust ratio (:func:`uses_trust_ratio`)."""
        return uses_trust_ratio(self.idx2name, index)

    def step(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """MXNet's unfused path: each weight in turn counts, then takes its lr and wd.

        Under ``multi_precision`` the trust ratio uses the float32 master. Dense semantics for
        sparse gradients (``lazy_update`` is off on this path). Takes lists or one of each.
        """
        indices, weights, grads, states = as_lists(indices, weights, grads, states)
        members = self._members(indices, weights, grads, states)  # before counting: a bad call changes nothing
        lrs, wds = [], []
        for index in indices:
            # Counted one at a time, so the scheduler sees each weight's own num_update.
            self._update_count(index)
            lrs.append(self._get_lr(index))
            wds.append(self._get_wd(index))
        self._apply(indices, members, lrs, wds, norm_source="master", lazy_update=False)

    def fused_step(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """MXNet's fused path (aggregated or not): all indices count first, then one scheduler call.

        Under ``multi_precision`` the trust ratio uses the float16 weight as stored. Row-sparse
        gradients follow ``lazy_update``. Takes lists or one of each.
        """
        indices, weights, grads, states = as_lists(indices, weights, grads, states)
        members = self._members(indices, weights, grads, states)  # before counting: a bad call changes nothing
        self._update_count(indices)
        lrs = self._get_lrs(indices)
        wds = self._get_wds(indices)
        self._apply(indices, members, lrs, wds, norm_source="param", lazy_update=self.lazy_update)

    def _members(self, indices: Sequence[Index], weights: Sequence[Any], grads: Sequence[Any],
                 states: Sequence[Any]) -> list[_step.Member]:
        """Every weight of the call checked and resolved; a float16 weight's state under
        ``multi_precision`` is MXNet 2.0's ``(master_fp32, momentum)`` pair."""
        return [_step.resolve(*arrays, multi_precision=self.multi_precision, pair=("master", "momentum"))
                for arrays in zip(indices, weights, grads, states)]

    def _apply(self, indices: Sequence[Index], members: Sequence[_step.Member], lrs: Sequence[float],
               wds: Sequence[float], *, norm_source: str, lazy_update: bool) -> None:
        """One :class:`~larsopt.options.LarsOptions` per weight, handed to the core (checked: a
        negative lr from a scheduler or weight decay is a ``ValueError``).

        The hyper-parameters reach the core as Python floats and bools (NumPy scalars are accepted here).
        """
        # The fused kernels clip iff clip_gradient >= 0, and step with momentum only if it is > 0.
        clip = float(self.clip_gradient) if self.clip_gradient is not None and self.clip_gradient >= 0 else None
        options = [
            LarsOptions(
                lr=float(lr),
                weight_decay=float(wd),
                momentum=float(self.momentum) if member.momentum_buffer is not None and self.momentum > 0 else 0.0,
                eta=float(self.eta),
                epsilon=float(self.epsilon),
                adapt=self.uses_trust_ratio(index),
                momentum_form="paper",
                trust_norm="sum",
                rescale_grad=float(self.rescale_grad),
                clip_gradient=clip,
                norm_source=norm_source,
                math_dtype=member.math_dtype,
                lazy_update=bool(lazy_update),
            )
            for index, member, lr, wd in zip(indices, members, lrs, wds)
        ]
        _step.run(members, options, check=LarsOptions.check)
