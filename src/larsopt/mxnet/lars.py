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
from typing import Any, NamedTuple

import torch
from torch import Tensor

from larsopt import functional
from larsopt.mxnet import _arrays, _checks
from larsopt.mxnet.errors import MXNetAssertionError
from larsopt.mxnet.optimizer import Index, Optimizer, as_lists, register

#: Name suffixes that MXNet's LARS exempts from the trust ratio (their weight decay stays).
EXCLUDED_NAME_SUFFIXES = ("gamma", "beta", "bias")

_ONE_X_FRONT_END = ("For MXNet 1.x numbers (eps=0 by default, momentum correction, lazy_update=True by "
                    "default) use an MXNet 1.x front-end, not this MXNet 2.0 class.")


class _Member(NamedTuple):
    """One weight of an update call, resolved into what the functional core takes."""

    param: Tensor
    grad: Tensor
    momentum_buffer: Tensor | None
    master: Tensor | None


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
        """Whether ``index`` gets the trust ratio: not if its name (``idx2name``, else
        ``str(index)``) ends in gamma, beta or bias (plain ``str.endswith``, as MXNet)."""
        name = self.idx2name[index] if index in self.idx2name else str(index)
        return not name.endswith(EXCLUDED_NAME_SUFFIXES)

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
                 states: Sequence[Any]) -> list[tuple[_Member, torch.dtype | None]]:
        """Every weight of the call checked and resolved (see :meth:`_member`)."""
        return [self._member(*arrays) for arrays in zip(indices, weights, grads, states)]

    @torch.no_grad()
    def _apply(self, indices: Sequence[Index], members: Sequence[tuple[_Member, torch.dtype | None]],
               lrs: Sequence[float], wds: Sequence[float], *, norm_source: str, lazy_update: bool) -> None:
        """Group the weights by what the core takes as scalars and call it once per group.

        Runs without autograd: the weights may be a model's parameters (leaves that require grad).
        The hyper-parameters reach the core as Python floats and bools (NumPy scalars are accepted here).
        """
        # The fused kernels clip iff clip_gradient >= 0, and step with momentum only if it is > 0.
        clip = float(self.clip_gradient) if self.clip_gradient is not None and self.clip_gradient >= 0 else None
        groups: dict[tuple, list[_Member]] = {}
        for index, (member, math_dtype), lr, wd in zip(indices, members, lrs, wds):
            momentum = float(self.momentum) if member.momentum_buffer is not None and self.momentum > 0 else 0.0
            key = (float(lr), float(wd), self.uses_trust_ratio(index), momentum, math_dtype)
            groups.setdefault(key, []).append(member)
        for (lr, wd, adapt, momentum, math_dtype), members in groups.items():
            functional.lars(
                [member.param for member in members],
                [member.grad for member in members],
                [member.momentum_buffer for member in members],
                lr=lr,
                weight_decay=wd,
                momentum=momentum,
                eta=float(self.eta),
                epsilon=float(self.epsilon),
                adapt=adapt,
                momentum_form="paper",
                trust_norm="sum",
                rescale_grad=float(self.rescale_grad),
                clip_gradient=clip,
                master_params=[member.master for member in members],
                norm_source=norm_source,
                math_dtype=math_dtype,
                lazy_update=bool(lazy_update),
            )

    def _member(self, index: Index, weight: Any, grad: Any, state: Any) -> tuple[_Member, torch.dtype | None]:
        """Torch views of one weight's arrays, checked, and the dtype its update is computed in.

        Raises ``TypeError`` for an array of the wrong kind or dtype (integer weights would be
        truncated) and ``ValueError`` for a grad or state whose shape is not the weight's.
        """
        param = _arrays.as_tensor(weight, f"weight of index {index!r}", writable=True)
        grad_tensor = _arrays.as_tensor(grad, f"grad of index {index!r}", writable=False)
        _arrays.check_floating(param, f"weight of index {index!r}")
        _arrays.check_floating(grad_tensor, f"grad of index {index!r}")
        if param.layout != torch.strided:
            raise TypeError(f"weight of index {index!r} must be dense, got layout {param.layout}")
        if grad_tensor.shape != param.shape:
            raise ValueError(f"grad of index {index!r} has shape {tuple(grad_tensor.shape)}, its weight "
                             f"{tuple(param.shape)}")
        if grad_tensor.is_sparse:
            if grad_tensor.sparse_dim() != 1:
                raise ValueError(f"grad of index {index!r} is sparse with sparse_dim={grad_tensor.sparse_dim()}; "
                                 "only row-sparse gradients (sparse_dim == 1, MXNet's row_sparse) are supported")
            # MXNet's row_sparse rows are unique; coalescing (a new tensor) sums duplicate rows.
            grad_tensor = grad_tensor.coalesce()
        master = None
        if self.multi_precision and param.dtype == torch.float16:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ValueError(f"state of float16 index {index!r} under multi_precision must be the "
                                 "(master_fp32, momentum) pair of create_state_multi_precision, got "
                                 f"{type(state).__name__}")
            master = self._state_tensor(state[0], f"master weight of index {index!r}", param)
            state = state[1]
        buffer = None if state is None else self._state_tensor(state, f"state of index {index!r}", param)
        # float16 without a master computes in float16, as MXNet's float16 kernels do.
        math_dtype = torch.float16 if param.dtype == torch.float16 and master is None else None
        return _Member(param, grad_tensor, buffer, master), math_dtype

    @staticmethod
    def _state_tensor(state: Any, what: str, param: Tensor) -> Tensor:
        """A state array as a tensor updated in place; it must be dense, floating and of the
        weight's shape (the same number of elements in another shape is an error too)."""
        tensor = _arrays.as_tensor(state, what, writable=True)
        _arrays.check_floating(tensor, what)
        if tensor.layout != torch.strided:
            raise TypeError(f"{what} must be dense, got layout {tensor.layout}")
        if tensor.shape != param.shape:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}, its weight {tuple(param.shape)}; "
                             "a state must have its weight's shape (create it with create_state)")
        return tensor
