r"""The functional LARS core: one step over lists of tensors. Every front-end calls :func:`lars`.

For each tensor ``w`` with gradient ``g`` (``rescale_grad`` = r, ``clip_gradient`` = c,
``weight_decay`` = wd, ``momentum`` = mu):

.. code-block:: text

    g     = -g if maximize;  g = g / grad_scale if AMP
    gr    = r * g
    lam   = eta * |w| / (|gr| + wd * |w| + epsilon)        trust_norm="sum"    (MXNet, paper, timm, MLPerf)
          = eta * |w| / (|gr + wd * w| + epsilon)          trust_norm="update" (optax, FAIR SSL)
          = 1   if |w| == 0 or |gr| == 0 or a norm is not finite (MXNet's fallback; "update"
                also when |gr + wd * w| is 0 or not finite)
          = 1   if adapt is False (the group is excluded from LARS)
    lam   = min(lam / lr, 1)                               trust_clip=True (LARC clip mode)
    g'    = clip(gr, -c, c) + wd * w                       (clip after the norm, before weight decay)

    momentum_form="paper" (LARS Algorithm 1, MXNet, MLPerf):
        v = mu * v - lr * lam * g';   w = w + v            nesterov: w = w + mu * v - lr * lam * g'
    momentum_form="torch" (timm, Bolts, LARC wrapping torch SGD):
        b = mu * b + lam * g';        w = w - lr * b       nesterov: w = w - lr * (lam * g' + mu * b)
    momentum == 0 (both forms):       w = w - lr * lam * g'

Sums of squares accumulate in float64 on every path (finite tensors get finite norms, and tens of
millions of values are summed to 1e-9). The two momentum forms are equal while lr is constant and
differ as soon as it changes (warm-up, decay): "paper" keeps past steps at the lr they were taken
with, "torch" rescales the whole buffer by the current lr.

Momentum buffers are passed in; they are updated in place, like the params (a ``None`` entry is
a first step: see :func:`lars`). Gradients are never modified. Every impl behaves like the reference
toward autograd and function transforms: in grad mode, tensors that require grad, and tensors under a
``torch.func`` transform (``vmap``, ``grad``), take the reference's torch ops (so a leaf raises
torch's in-place error, a non-leaf update is recorded, ``vmap`` works).

Options come as one :class:`larsopt.options.LarsOptions` (declared once there: default, allowed
values, check, doc). Implementations (``impl=``, all sync-free and giving the reference's numbers)
form a chain, fused -> foreach -> reference: each path declares in its ``SUPPORTED`` table which
options and values it implements and in ``covers()`` which tensors it can serve (plain tensors
only: DTensors step as their local shards, other subclasses go on to the reference); a group using an
option a path does not implement, and every tensor it does not cover, is handed on in the same call.

* ``"reference"``: one tensor at a time, plain torch ops; covers every option.
* ``"foreach"``: ``torch._foreach_*`` ops per group of tensors sharing a device and dtypes, trust
  ratios of a group as one vector. Covers dense gradients, master copies included, without ``math_dtype`` or bf16
  stochastic rounding.
* ``"fused"``: on CPU, one native call per dtype for the whole step (a C++ kernel built on first
  use and cached on disk); on other devices, or without a C++ compiler, ``"foreach"``. Covers
  dense float32/float64/bfloat16 CPU tensors whose param, grad and buffer share one dense layout,
  without master copy, ``math_dtype`` or bf16 stochastic rounding.
* ``"auto"``: ``"fused"`` (see :func:`resolve_impl` for why).

Every path takes its norms as stacked sums of squares (``_impl/norms.py``) and its trust ratios
from them (``_impl/reference.ratios_from_sums``); between the two, a ``reduce_sums`` seam lets a
sharded step combine the sums of all tensors across processes with one collective.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import Any

import torch
from torch import Tensor

from larsopt._impl import foreach, fused_cpu, reference, sharded
from larsopt._impl.fused_cpu import CarriedWeightNorms
from larsopt.options import IMPLS, MOMENTUM_FORMS, NORM_SOURCES, TRUST_NORMS, LarsOptions, unsupported

__all__ = ["IMPLS", "MOMENTUM_FORMS", "NORM_SOURCES", "TRUST_NORMS", "CarriedWeightNorms", "LarsOptions", "lars",
           "resolve_impl", "trust_ratio"]

#: The trust ratio of one tensor (0-d tensor), as every implementation computes it.
trust_ratio = reference.trust_ratio

_Tensors = Sequence[Tensor]
_MaybeTensors = Sequence["Tensor | None"]


def resolve_impl(impl: str) -> str:
    """The implementation ``impl="auto"`` stands for: ``"fused"``.

    Why (measurements in ``docs/performance.md``, 2-core CPU): the fused CPU kernel runs a step in
    1.2-1.5x the time of ``torch.optim.SGD(fused=True)`` on ResNet-50 and BERT-base shapes (a LARS
    step must read weights and gradients twice), 0.35-0.6x on a machine busy with other programs,
    10-20x faster than ``"foreach"`` and
    ``"reference"`` there, and allocates nothing. Its one-time build takes about 2-3 s and is
    cached on disk (milliseconds to load afterwards), inside the budget of 10 s for a cold first
    step and 3 s for a warm one; nothing is compiled per model, shape or lr value. On other
    devices, and on CPU without a C++ compiler, ``"fused"`` runs the sync-free ``"foreach"`` path.
    """
    if impl == "auto":
        return "fused"
    return impl


#: Each implementation and the paths its tensors go down, in order: a path hands on what it does
#: not cover (by tensor) or implement (by option, per its ``SUPPORTED`` table).
_CHAINS = {"reference": ("reference",), "foreach": ("foreach", "reference"),
           "fused": ("fused", "foreach", "reference")}
_PATHS = {"reference": reference, "foreach": foreach, "fused": fused_cpu}
_STEPS = {"reference": reference.lars_step, "foreach": foreach.lars_step, "fused": fused_cpu.step}


def _others(indices: list[int], count: int) -> list[int]:
    """0..count-1 without ``indices``."""
    taken = set(indices)
    return [i for i in range(count) if i not in taken]


def lars(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: MutableSequence[Tensor | None],
    options: LarsOptions | None = None,
    *,
    master_params: Sequence[Tensor | None] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: Tensor | None = None,
    param_names: Sequence[str] | None = None,
    previous_lr: float | Tensor | None = None,
    impl: str = "auto",
    carry: CarriedWeightNorms | None = None,
    **option_values: Any,
) -> None:
    """Apply one LARS step in place to ``params`` (and ``momentum_buffers``, ``master_params``).

    The formulas are in the module docstring. The options come as a :class:`LarsOptions` (not
    checked again: front-ends check theirs once) or as keywords (``lr=0.1, momentum=0.9, ...``;
    checked, ``lr`` required), not both.

    Args:
        params: the tensors to update.
        grads: their gradients (dense, or sparse COO with ``sparse_dim == 1``), read only. These
            lists, ``momentum_buffers`` and ``master_params`` have one entry per param (else
            ``ValueError``, nothing changed).
        momentum_buffers: one entry per param; unused (``None``) when ``momentum == 0``. With
            momentum, a ``None`` entry is a first step: the buffer is created in the list (in the
            param's dtype, float32 with a master copy) and starts as the first update itself, as in
            torch SGD; without dampening that is the same as a buffer of zeros.
        options: the step's :class:`LarsOptions`; or give them as keywords.
        master_params: optional float32 master copies (``None`` entries for params without
            one). The update is computed on the master and written back rounded to the param.
        grad_scale, found_inf: AMP (``torch.amp.GradScaler``): gradients are divided by
            ``grad_scale`` before anything else, and ``found_inf > 0`` leaves every tensor
            unchanged, without a host synchronisation.
        generator: seeds ``stochastic_rounding``.
        stats: optional ``(len(params), 3)`` float32 tensor that gets each tensor's |w|, |g| (the
            rescaled gradient's norm) and trust ratio lam, from the values the step computes
            anyway (no extra pass, no host sync). A group with ``adapt=False`` takes no norms:
            its rows are (nan, nan, 1).
        param_names: names of the params, for error messages.
        previous_lr: the lr of the previous step, for ``momentum_correction`` (``None``: a first
            step, no correction).
        impl: one of :data:`IMPLS` (see the module docstring; ``"auto"`` is ``"fused"``).
        carry: a :class:`CarriedWeightNorms` kept from step to step (``LARS(carry_weight_norms=True)``):
            the fused CPU kernel keeps each large tensor's |w|^2 from its update for the next
            step's norms, which then read only the gradient (same numbers, less memory traffic).
            Only correct if the weights are written between steps only in ways their version
            counter sees (not through ``p.data``): see :class:`CarriedWeightNorms`. DTensor params
            and the other paths do not use it.

    DTensor params (FSDP2, HSDP, tensor parallel) step on their local shards with the norms of the
    full tensors: one all-reduce of the stacked sums of squares per (mesh, placements) group and
    sharding mesh dim, whatever the number of tensors (``larsopt._impl.sharded``).
    """
    if options is None:
        if "lr" not in option_values:
            raise TypeError("lars() needs the learning rate: pass lr=... (or a LarsOptions)")
        options = LarsOptions.from_keywords(option_values)
    elif option_values:
        raise TypeError(f"lars() takes a LarsOptions or option keywords, not both (got {sorted(option_values)})")
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if stats is not None and (not isinstance(stats, Tensor) or stats.shape != (len(params), 3)
                              or stats.dtype != torch.float32):
        raise ValueError(f"Invalid stats: expected a float32 tensor of shape ({len(params)}, 3), got "
                         f"{tuple(stats.shape) if isinstance(stats, Tensor) else type(stats).__name__}"
                         f"{' ' + str(stats.dtype) if isinstance(stats, Tensor) else ''}")
    if carry is not None and not isinstance(carry, CarriedWeightNorms):
        raise ValueError(f"Invalid carry: {type(carry).__name__}; expected a larsopt.functional.CarriedWeightNorms "
                         "or None")
    lengths = {"grads": len(grads), "momentum_buffers": len(momentum_buffers),
               "master_params": len(params) if master_params is None else len(master_params)}
    for name, length in lengths.items():
        if length != len(params):
            raise ValueError(f"lars() got {len(params)} params and {length} {name}; expected one entry of {name} "
                             "per param (no tensor was changed)")
    if not params:
        return
    if master_params is None:
        master_params = [None] * len(params)
    if not options.lazy_update:
        # A standard (non-lazy) sparse update is the dense update: densify once (duplicate indices
        # are summed) so that every path, fast ones included, gives exactly the dense result.
        grads = [grad.to_dense() if grad.is_sparse else grad for grad in grads]
    options = options.effective()
    first_steps = _create_missing_buffers(params, momentum_buffers, master_params) if options.momentum != 0 else None
    chain = _CHAINS[resolve_impl(impl)]
    if sharded.possible() and any(sharded.is_sharded(param) for param in params):
        label = (lambda i: repr(param_names[i])) if param_names is not None else (lambda i: f"#{i}")
        found_inf = sharded.reduce_found_inf(found_inf, params)
        for part in sharded.parts(params, grads, momentum_buffers, master_params, label):
            _run_chain(chain, part.indices, part.params, part.grads, part.buffers, part.masters, options, stats,
                       dict(grad_scale=grad_scale, found_inf=found_inf, reduce_sums=part.reduce_sums), generator,
                       None if first_steps is None else [first_steps[i] for i in part.indices], previous_lr)
            part.finish()
        return
    _run_chain(chain, list(range(len(params))), params, grads, momentum_buffers, master_params, options, stats,
               dict(grad_scale=grad_scale, found_inf=found_inf), generator, first_steps, previous_lr, carry)


def _run_chain(chain: tuple[str, ...], indices: list[int], params: _Tensors, grads: _Tensors, buffers: _MaybeTensors,
               masters: _MaybeTensors, options: LarsOptions, stats: Tensor | None, inputs: dict[str, Any],
               generator: torch.Generator | None, first_steps: list[bool] | None,
               previous_lr: float | Tensor | None = None, carry: CarriedWeightNorms | None = None) -> None:
    """Hand the tensors (``indices`` are their rows of ``stats``) down the chain of paths."""
    pending = list(range(len(params)))
    for path in chain:
        if path != chain[-1] and unsupported(options, _PATHS[path].SUPPORTED) is not None:
            continue
        path_inputs = inputs
        if path == "fused" and carry is not None:
            path_inputs = dict(inputs, carry=carry)
        if path == "reference":
            # (stochastic rounding and dampening: only the reference implements them)
            path_inputs = dict(inputs, generator=generator,
                               first_steps=None if first_steps is None else [first_steps[k] for k in pending])
            if previous_lr is not None:
                path_inputs["previous_lr"] = previous_lr
        pending = _run(path, pending, params, grads, buffers, masters, options, stats, path_inputs, indices)
        if not pending:
            return


def _create_missing_buffers(params: _Tensors, buffers: MutableSequence[Tensor | None],
                            masters: _MaybeTensors) -> list[bool] | None:
    """A first step's momentum buffers, created as zeros in ``buffers``; which ones were (``None``:
    none). Without dampening a zero buffer takes the first update whole, so the fast paths (which
    implement no dampening) need nothing else; the reference gets the list."""
    created = None
    for i, buf in enumerate(buffers):
        if buf is None:
            target = masters[i] if masters[i] is not None else params[i]
            buffers[i] = torch.zeros_like(target, memory_format=torch.preserve_format)
            if created is None:
                created = [False] * len(buffers)
            created[i] = True
    return created


def _run(path: str, pending: list[int], params: _Tensors, grads: _Tensors, buffers: _MaybeTensors,
         masters: _MaybeTensors, options: LarsOptions, stats: Tensor | None, inputs: dict[str, Any],
         rows_of: list[int]) -> list[int]:
    """Step the tensors at ``pending`` that ``path`` covers; return the positions of the others.
    ``rows_of[k]`` is tensor ``k``'s row of ``stats``."""
    if len(pending) != len(params):
        params, grads, buffers, masters = ([items[i] for i in pending] for items in (params, grads, buffers, masters))
    rows = None if stats is None else torch.empty(len(pending), 3, dtype=torch.float32, device=stats.device)
    rest = _STEPS[path](params, grads, buffers, masters, options, stats=rows, **inputs) or []
    if stats is not None:
        done = _others(rest, len(pending))
        stats[[rows_of[pending[k]] for k in done]] = rows[done]
    return [pending[k] for k in rest]
