"""The readable definition of one LARS step: one tensor at a time, plain torch ops.

Every faster implementation is tested against this file on the same inputs. It is also the path
taken for tensors the fast paths do not cover. It never synchronises with the host: every
data-dependent choice is a ``torch.where``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from larsopt._impl.norms import SUMS_DTYPE, compute_dtype, sums_of_squares
from larsopt.options import ANY, LarsOptions

#: Every option, every value: the reference is the definition.
SUPPORTED = {name: ANY for name in LarsOptions.__dataclass_fields__}


def ratios_from_sums(sums: Tensor, options: LarsOptions, dtype: torch.dtype) -> Tensor:
    """The layer-wise trust ratios ``lam`` (in ``dtype``) from stacked sums of squares ``sums[..., 0:3]``
    = (|w|^2, |g|^2, |g + wd * w|^2), ``g`` the rescaled gradient ``rescale_grad * g`` (not clipped).

    * ``trust_norm="sum"``:    lam = eta * |w| / (|g| + wd * |w| + epsilon)
    * ``trust_norm="update"``: lam = eta * |w| / (|g + wd * w| + epsilon)
    * ``trust_clip``:          lam = min(lam / lr, 1)   (LARC)

    Fallback (see :func:`ratio_valid`): lam = 1 (the plain lr, no eta), clipped too under
    ``fallback="ratio_one"`` and not under ``"plain_step"``. Every path takes its ratios from here.
    """
    return trust_terms(sums, options, dtype)[0]


def ratio_valid(norms: Tensor, options: LarsOptions) -> Tensor:
    """Where the trust ratio is taken rather than falling back, from the norms (|w|, |g|, |g + wd * w|).

    ``fallback_on="zero_norm"`` (MXNet's rule, the same for both norms): not when |w| == 0 or |g| == 0
    ("update": or |g + wd * w| == 0, so lam is always finite). ``"zero_denominator"``: not when |w| == 0
    or the denominator without epsilon is 0 (|g| + wd * |w|, or |g + wd * w|): a zero gradient with
    weight decay then gets eta / wd. Never when a norm is not finite."""
    w_norm, g_norm, u_norm = norms[..., 0], norms[..., 1], norms[..., 2]
    valid = (w_norm > 0) & torch.isfinite(w_norm) & torch.isfinite(g_norm)
    if options.trust_norm == "update":
        valid &= torch.isfinite(u_norm) & (u_norm > 0)
        return valid & (g_norm > 0) if options.fallback_on == "zero_norm" else valid
    if options.fallback_on == "zero_norm":
        return valid & (g_norm > 0)
    return valid & (g_norm + options.weight_decay * w_norm > 0)


def trust_terms(sums: Tensor, options: LarsOptions, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(lam, where the ratio did not fall back) from the sums, as :func:`ratios_from_sums` describes."""
    norms = sums.sqrt().to(dtype)
    w_norm = norms[..., 0]
    valid = ratio_valid(norms, options)
    if options.trust_norm == "sum":
        denominator = norms[..., 1] + options.weight_decay * w_norm + options.epsilon
    else:
        denominator = norms[..., 2] + options.epsilon
    one = torch.ones_like(w_norm)
    lam = torch.where(valid, options.eta * w_norm / denominator, one)
    if options.trust_clip:
        lam = clip_trust_ratio(lam, options.lr)
        if options.fallback == "plain_step":
            lam = torch.where(valid, lam, one)
    return lam, valid


def trust_ratio(w_norm: Tensor, grad: Tensor, weight: Tensor, *, weight_decay: float, eta: float, epsilon: float,
                trust_norm: str) -> Tensor:
    """The trust ratio (0-d tensor) of one tensor with norm ``w_norm`` and rescaled gradient ``grad``
    (see :func:`ratios_from_sums`), in the dtype of its norms."""
    g_sums = sums_of_squares([grad])
    if trust_norm == "update":
        u_sums = sums_of_squares([grad + weight_decay * weight]) if weight_decay != 0 else g_sums
    else:
        u_sums = torch.zeros_like(g_sums)  # not read
    sums = torch.cat([w_norm.reshape(1).to(SUMS_DTYPE).square(), g_sums, u_sums])
    dtype = torch.promote_types(w_norm.dtype, compute_dtype(grad.dtype))
    return ratios_from_sums(sums, LarsOptions(weight_decay=weight_decay, eta=eta, epsilon=epsilon,
                                              trust_norm=trust_norm), dtype)


def clip_trust_ratio(lam: Tensor, lr: float | Tensor) -> Tensor:
    """LARC clipping: lam <- min(lam / lr, 1), so the step size is min(lr * lam, lr) / lr * lr.

    Written with ``where`` so that lr == 0 gives 1 (and a zero step) instead of 0/0.
    """
    return torch.where(lam < lr, lam / lr, torch.ones_like(lam))


def stochastic_round_to_bfloat16(value: Tensor, generator: torch.Generator | None) -> Tensor:
    """Round float32 ``value`` to bfloat16, up with probability equal to the dropped fraction.

    bfloat16 keeps the top 16 bits of a float32; adding uniform noise below them and truncating
    rounds up exactly as often as the truncated part is large, so E[round(x)] = x.
    """
    bits = value.to(torch.float32).view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _updated(weight: Tensor, grad: Tensor, buf: Tensor | None, lam: Tensor, options: LarsOptions, *,
             weight_decay: float | Tensor, momentum: float | Tensor, clip_gradient: float | None,
             first_step: bool) -> tuple[Tensor, Tensor | None]:
    """New (weight, momentum buffer) from the rescaled gradient and the trust ratio. The scalars given
    apart from ``options`` are those rounded to a low-precision math dtype; ``weight_decay`` is a 0-d
    tensor where it depends on the tensor's fallback (``fallback="plain_step"``). ``first_step``: the
    buffer was created for this step (``buffer_start="update"`` then leaves it undampened)."""
    dtype = weight.dtype
    lr = options.lr
    update = grad
    if clip_gradient is not None:
        update = update.clamp(-clip_gradient, clip_gradient)
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        update = update + weight_decay * weight
    if options.momentum == 0:
        return weight - (lr * lam).to(dtype) * update, None
    # The share of this step's update the buffer takes: 1 - d, but all of it for a first step that
    # starts the buffer from the update itself (torch SGD).
    kept = 1.0 if first_step and options.buffer_start == "update" else 1.0 - options.dampening
    if options.momentum_form == "paper":
        # v = mu * v - lr * lam * g';  w += v   (nesterov: w += mu * v - lr * lam * g')
        step = (lr * lam).to(dtype) * update
        new_buf = momentum * buf.to(dtype) - (step if kept == 1.0 else kept * step)
        return weight + (momentum * new_buf - step if options.nesterov else new_buf), new_buf
    # b = mu * b + lam * g';  w -= lr * b   (nesterov: w -= lr * (lam * g' + mu * b))
    scaled = lam.to(dtype) * update
    new_buf = momentum * buf.to(dtype) + (scaled if kept == 1.0 else kept * scaled)
    return weight - lr * (scaled + momentum * new_buf if options.nesterov else new_buf), new_buf


@dataclass
class _Prepared:
    """One tensor's inputs to the formula, in its math dtype."""

    dtype: torch.dtype
    weight: Tensor
    grad: Tensor  # the rescaled gradient (the present rows' values for a lazy sparse update)
    norm_grad: Tensor  # the gradient whose norm the trust ratio takes
    norm_weight: Tensor  # the tensor whose norm is |w|
    lazy_rows: Tensor | None
    low_precision_math: bool


def _prepare(param: Tensor, grad: Tensor, master: Tensor | None, options: LarsOptions,
             grad_scale: Tensor | None) -> _Prepared:
    target = master if master is not None else param
    dtype = options.math_dtype if options.math_dtype is not None else compute_dtype(target.dtype)
    # A float16/bfloat16 math_dtype (MXNet's kernels without master copies) rounds the update's
    # scalars to that dtype, as those kernels do; the trust ratio still reads float32 values.
    low_precision_math = dtype.itemsize < 4

    def prepared(values: Tensor, as_dtype: torch.dtype, rescale: float) -> Tensor:
        values = values.to(as_dtype)
        if options.maximize:
            values = -values
        if grad_scale is not None:
            values = values / grad_scale.to(device=values.device, dtype=as_dtype)
        return values * rescale if rescale != 1.0 else values

    def prepared_pair(values: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient for the update, gradient for the trust-ratio norm)."""
        for_update = prepared(values, dtype, _in_math(options.rescale_grad, dtype))
        if not low_precision_math:
            return for_update, for_update
        return for_update, prepared(values, compute_dtype(dtype), options.rescale_grad)

    lazy_rows = None
    if grad.is_sparse and options.lazy_update:
        grad = grad.coalesce()  # sums duplicate indices
        lazy_rows = grad.indices()[0]
        grad_rows, norm_grad = prepared_pair(grad.values())
        if options.trust_norm == "update":  # |g| of the present rows is the dense |g|, but |g + wd * w| is not
            norm_grad = prepared_pair(grad.to_dense())[1]
    else:
        grad_rows, norm_grad = prepared_pair(grad)  # dense (functional.lars densifies non-lazy sparse grads)
    norm_weight = param if options.norm_source == "param" else target
    return _Prepared(dtype, target.to(dtype), grad_rows, norm_grad, norm_weight, lazy_rows, low_precision_math)


def _in_math(value: float | None, dtype: torch.dtype) -> float | None:
    """``value`` rounded to a low-precision math dtype (MXNet's float16 kernels), else as is."""
    return float(torch.tensor(value, dtype=dtype)) if dtype.itemsize < 4 and value is not None else value


def _sums(prepared: _Prepared, options: LarsOptions) -> Tensor:
    """(|w|^2, |g|^2, |g + wd * w|^2) of one tensor."""
    w_sums = sums_of_squares([prepared.norm_weight])
    g_sums = sums_of_squares([prepared.norm_grad])
    if options.trust_norm == "update" and options.weight_decay != 0:
        u_sums = sums_of_squares([prepared.norm_grad + options.weight_decay * prepared.weight])
    else:
        u_sums = g_sums  # g + 0 * w is g (and "sum" does not read it)
    return torch.cat([w_sums, g_sums, u_sums])


def _ratio_dtype(prepared: _Prepared, options: LarsOptions) -> torch.dtype:
    """The dtype of one tensor's trust ratio: that of its norms."""
    dtype = torch.promote_types(compute_dtype(prepared.norm_weight.dtype), compute_dtype(prepared.norm_grad.dtype))
    if options.trust_norm == "update" and options.weight_decay != 0:
        dtype = torch.promote_types(dtype, compute_dtype(prepared.weight.dtype))
    return dtype


def _apply(param: Tensor, master: Tensor | None, buf: Tensor | None, prepared: _Prepared, lam: Tensor,
           valid: Tensor | None, options: LarsOptions, found_inf: Tensor | None, generator: torch.Generator | None,
           first_step: bool, momentum: float | Tensor) -> None:
    """Write one tensor's update (and its buffer's and master's). ``valid``: whether its trust ratio
    was taken (``None``: the group does not adapt); ``momentum``: after momentum correction."""
    dtype, weight = prepared.dtype, prepared.weight
    weight_decay = _in_math(options.weight_decay, dtype)
    if options.fallback == "plain_step" and valid is not None:
        # a tensor whose ratio falls back takes its plain gradient step, without weight decay
        weight_decay = torch.where(valid, torch.tensor(weight_decay, dtype=dtype, device=param.device), 0.0)
    if isinstance(momentum, Tensor):
        momentum = momentum.to(device=param.device, dtype=dtype)
    else:
        momentum = _in_math(momentum, dtype)
    scalars = dict(weight_decay=weight_decay, momentum=momentum, clip_gradient=_in_math(options.clip_gradient, dtype),
                   first_step=first_step)
    rows = prepared.lazy_rows
    if rows is None:
        new_weight, new_buf = _updated(weight, prepared.grad, buf, lam, options, **scalars)
    else:
        # Lazy sparse update: only the rows present in the gradient change.
        row_buf = buf.index_select(0, rows) if buf is not None else None
        new_rows, new_buf_rows = _updated(weight.index_select(0, rows), prepared.grad, row_buf, lam, options,
                                          **scalars)
        new_weight = weight.index_copy(0, rows, new_rows)
        new_buf = buf.to(dtype).index_copy(0, rows, new_buf_rows) if buf is not None else None

    if found_inf is not None:
        # AMP: an inf/NaN gradient anywhere skips the whole step, without a host sync.
        skip = found_inf.to(param.device) > 0
        new_weight = torch.where(skip, weight, new_weight)
        if new_buf is not None:
            new_buf = torch.where(skip, buf.to(dtype), new_buf)

    if new_buf is not None:
        buf.copy_(new_buf)
    if master is not None:
        master.copy_(new_weight)
    if options.stochastic_rounding and master is None and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round_to_bfloat16(new_weight, generator))
    else:
        param.copy_(new_weight)


def corrected_momentum(options: LarsOptions, previous_lr: float | Tensor | None) -> float | Tensor:
    """mu, times lr / previous_lr under ``momentum_correction`` (MXNet 1.x: not on a first step, and not
    after a step at lr 0)."""
    if not options.momentum_correction or previous_lr is None or options.momentum == 0:
        return options.momentum
    lr = options.lr
    if isinstance(lr, Tensor) or isinstance(previous_lr, Tensor):
        previous = torch.as_tensor(previous_lr, dtype=SUMS_DTYPE)
        ratio = torch.where(previous != 0, torch.as_tensor(lr, dtype=SUMS_DTYPE) / previous, 1.0)
        return options.momentum * ratio
    return options.momentum * lr / previous_lr if previous_lr != 0 else options.momentum


def stats_rows(sums: Tensor, lam: Tensor) -> Tensor:
    """(|w|, |g|, lam) as float32 from sums of squares ``sums[..., 0:3]`` and trust ratios ``lam``:
    what a step reports of each tensor."""
    return torch.cat([sums[..., :2].sqrt(), lam[..., None].to(SUMS_DTYPE)], dim=-1).to(torch.float32)


#: The stats row of a tensor whose group does not take the trust ratio: no norm is computed.
def unadapted_stats(count: int, device: torch.device) -> Tensor:
    rows = torch.full((count, 3), float("nan"), dtype=torch.float32, device=device)
    rows[:, 2] = 1.0
    return rows


def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    master_params: Sequence[Tensor | None],
    options: LarsOptions,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: Tensor | None = None,
    reduce_sums: Callable[[Tensor], Tensor] | None = None,
    first_steps: Sequence[bool] | None = None,
    previous_lr: float | Tensor | None = None,
) -> None:
    """See :func:`larsopt.functional.lars` for the arguments and the formulas.

    ``stats``: a ``(len(params), 3)`` float32 tensor that gets each tensor's (|w|, |g|, lam).
    ``first_steps``: which momentum buffers were created for this step (``None``: none).
    ``previous_lr``: the lr of the group's previous step, for ``momentum_correction``.
    ``reduce_sums``: applied to the stacked sums of squares of all tensors before any trust ratio
    is taken (a sharded step's all-reduce); the step then prepares each tensor twice (once for its
    sums, once for its update) rather than holding every tensor's prepared inputs at once."""
    momentum = corrected_momentum(options, previous_lr)
    if reduce_sums is not None and options.adapt:
        sums = torch.stack([
            _sums(_prepare(param, grads[i], master_params[i], options, grad_scale), options)
            for i, param in enumerate(params)
        ]) if params else torch.zeros(0, 3, dtype=SUMS_DTYPE)
        sums = reduce_sums(sums)
    for i, param in enumerate(params):
        master = master_params[i]
        prepared = _prepare(param, grads[i], master, options, grad_scale)
        valid = None
        if options.adapt:
            tensor_sums = sums[i] if reduce_sums is not None else _sums(prepared, options)
            lam, valid = trust_terms(tensor_sums, options, _ratio_dtype(prepared, options))
            if stats is not None:
                stats[i] = stats_rows(tensor_sums, lam)
        else:
            lam = torch.ones((), dtype=compute_dtype(prepared.dtype), device=param.device)
        _apply(param, master, momentum_buffers[i], prepared, lam, valid, options, found_inf, generator,
               first_steps is not None and first_steps[i], momentum)
    if stats is not None and not options.adapt:
        stats.copy_(unadapted_stats(len(params), stats.device))
