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

Norms accumulate in float32 at least. The two momentum forms are equal while lr is constant and
differ as soon as it changes (warm-up, decay): "paper" keeps past steps at the lr they were taken
with, "torch" rescales the whole buffer by the current lr.

Momentum buffers are passed in (zeros before the first step); they are updated in place, like
the params. Gradients are never modified.

Implementations (``impl=``, all sync-free and giving the reference's numbers; a tensor that a path
does not cover is handed on, in the same call, fused -> foreach -> reference):

* ``"reference"``: one tensor at a time, plain torch ops; covers every option.
* ``"foreach"``: ``torch._foreach_*`` ops per group of tensors sharing a device and dtypes, trust
  ratios of a group as one vector. Covers dense gradients, master copies included, without ``math_dtype`` or bf16
  stochastic rounding.
* ``"fused"``: on CPU, one native call per dtype for the whole step (a C++ kernel built on first
  use and cached on disk); on other devices, or without a C++ compiler, ``"foreach"``. Covers
  dense float32/float64/bfloat16 CPU tensors whose param, grad and buffer share one dense layout,
  without master copy, ``math_dtype`` or bf16 stochastic rounding.
* ``"auto"``: ``"fused"`` (see :func:`resolve_impl` for why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from larsopt._impl import foreach, fused_cpu, reference

MOMENTUM_FORMS = ("paper", "torch")
TRUST_NORMS = ("sum", "update")
NORM_SOURCES = ("master", "param")
IMPLS = ("auto", "reference", "foreach", "fused")

#: The trust ratio of one tensor (0-d tensor), as every implementation computes it.
trust_ratio = reference.trust_ratio


_Tensors = Sequence[Tensor]
_MaybeTensors = Sequence["Tensor | None"]


def _foreach_step(params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors, master_params: _MaybeTensors,
                  **options: Any) -> None:
    """``"foreach"``: foreach for the tensors it covers, the reference for the rest."""
    covered = [
        i for i, (p, g, m) in enumerate(zip(params, grads, master_params))
        if foreach.covers(p, g, m, math_dtype=options["math_dtype"], stochastic_rounding=options["stochastic_rounding"])
    ]
    _run_foreach(covered, params, grads, momentum_buffers, master_params, options)
    _run_reference(_others(covered, len(params)), params, grads, momentum_buffers, master_params, options)


def _fused_step(params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors, master_params: _MaybeTensors,
                **options: Any) -> None:
    """``"fused"``: the CPU kernel for the tensors it covers (one call per dtype), foreach for
    the others it covers (master copies, other devices, no C++ compiler here), the reference for
    the rest."""
    rest = fused_cpu.step(params, grads, momentum_buffers, master_params,
                          **{name: options[name] for name in _FUSED_OPTIONS})
    covered = [
        i for i in rest
        if foreach.covers(params[i], grads[i], master_params[i], math_dtype=options["math_dtype"],
                          stochastic_rounding=options["stochastic_rounding"])
    ]
    _run_foreach(covered, params, grads, momentum_buffers, master_params, options)
    taken = set(covered)
    _run_reference([i for i in rest if i not in taken], params, grads, momentum_buffers, master_params, options)


_FUSED_OPTIONS = (
    "lr", "weight_decay", "momentum", "eta", "epsilon", "adapt", "nesterov", "momentum_form", "trust_norm",
    "trust_clip", "rescale_grad", "clip_gradient", "maximize", "grad_scale", "found_inf", "math_dtype",
    "stochastic_rounding",
)
_REFERENCE_ONLY_OPTIONS = ("math_dtype", "lazy_update", "stochastic_rounding", "generator")


def _others(indices: list[int], count: int) -> list[int]:
    """0..count-1 without ``indices``."""
    taken = set(indices)
    return [i for i in range(count) if i not in taken]


def _run_foreach(indices: list[int], params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors,
                 master_params: _MaybeTensors, options: dict[str, Any]) -> None:
    if indices:
        foreach.lars_step(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [momentum_buffers[i] for i in indices],
            [master_params[i] for i in indices],
            **{name: value for name, value in options.items() if name not in _REFERENCE_ONLY_OPTIONS},
        )


def _run_reference(indices: list[int], params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors,
                   master_params: _MaybeTensors, options: dict[str, Any]) -> None:
    if indices:
        reference.lars_step(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [momentum_buffers[i] for i in indices],
            [master_params[i] for i in indices],
            **options,
        )


_IMPLEMENTATIONS = {"reference": reference.lars_step, "foreach": _foreach_step, "fused": _fused_step}


def resolve_impl(impl: str) -> str:
    """The implementation ``impl="auto"`` stands for: ``"fused"``.

    Why (measurements in ``docs/performance.md``, 2-core CPU): the fused CPU kernel runs a step in
    1.2-1.4x the time of ``torch.optim.SGD(fused=True)`` on ResNet-50 and BERT-base shapes (a LARS
    step must read weights and gradients twice), 12-20x faster than ``"foreach"`` and
    ``"reference"`` there, and allocates nothing. Its one-time build takes about 2-3 s and is
    cached on disk (milliseconds to load afterwards), inside the budget of 10 s for a cold first
    step and 3 s for a warm one; nothing is compiled per model, shape or lr value. On other
    devices, and on CPU without a C++ compiler, ``"fused"`` runs the sync-free ``"foreach"`` path.
    """
    if impl == "auto":
        return "fused"
    return impl


def lars(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    eta: float = 0.001,
    epsilon: float = 1e-8,
    adapt: bool = True,
    nesterov: bool = False,
    momentum_form: str = "paper",
    trust_norm: str = "sum",
    trust_clip: bool = False,
    rescale_grad: float = 1.0,
    clip_gradient: float | None = None,
    maximize: bool = False,
    master_params: Sequence[Tensor | None] | None = None,
    norm_source: str = "master",
    math_dtype: torch.dtype | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lazy_update: bool = True,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> None:
    """Apply one LARS step in place to ``params`` (and ``momentum_buffers``, ``master_params``).

    The formulas are in the module docstring. This function validates nothing (the front-ends
    do); it computes everything.

    Args:
        params: the tensors to update.
        grads: their gradients (dense), read only.
        momentum_buffers: one per param; a tensor (zeros before the first step) when
            ``momentum != 0``, else ``None``.
        lr: learning rate, a float or a 0-d tensor (a tensor never causes a recompile).
        adapt: apply the trust ratio (``False``: lam = 1, e.g. for biases and norm layers).
        master_params: optional float32 master copies (``None`` entries for params without
            one). The update is computed on the master and written back rounded to the param.
        norm_source: ``"master"`` takes |w| from the master copy, ``"param"`` from the param
            as stored (MXNet's fused path under multi_precision).
        math_dtype: dtype of the update arithmetic; default the param dtype promoted to at
            least float32. MXNet's float16 kernels without master copies use float16.
        grad_scale, found_inf: AMP (``torch.amp.GradScaler``): gradients are divided by
            ``grad_scale`` before anything else, and ``found_inf > 0`` leaves every tensor
            unchanged, without a host synchronisation.
        lazy_update: for sparse gradients (COO, ``sparse_dim == 1``): ``True`` changes only the
            rows present (weight, momentum and weight decay); ``False`` gives the dense result.
            The trust ratio uses |w| over all rows and |g| over the present rows either way.
        stochastic_rounding: round the written-back bfloat16 param stochastically (unbiased),
            for bfloat16 params without a master copy; ``generator`` seeds it.
        impl: one of :data:`IMPLS` (see the module docstring; ``"auto"`` is ``"fused"``).
    """
    if not params:
        return
    if master_params is None:
        master_params = [None] * len(params)
    if not lazy_update:
        # A standard (non-lazy) sparse update is the dense update: densify once (duplicate indices
        # are summed) so that every path, fast ones included, gives exactly the dense result.
        grads = [grad.to_dense() if grad.is_sparse else grad for grad in grads]
    _IMPLEMENTATIONS[resolve_impl(impl)](
        params,
        grads,
        momentum_buffers,
        master_params,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        eta=eta,
        epsilon=epsilon,
        adapt=adapt,
        nesterov=nesterov,
        momentum_form=momentum_form,
        trust_norm=trust_norm,
        trust_clip=trust_clip,
        rescale_grad=rescale_grad,
        clip_gradient=clip_gradient,
        maximize=maximize,
        norm_source=norm_source,
        math_dtype=math_dtype,
        grad_scale=grad_scale,
        found_inf=found_inf,
        lazy_update=lazy_update,
        stochastic_rounding=stochastic_rounding,
        generator=generator,
    )
