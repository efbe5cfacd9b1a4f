"""The readable definition of one LARS step: one tensor at a time, plain torch ops.

Every faster implementation is tested against this file on the same inputs. It is also the path
taken for tensors the fast paths do not cover. It never synchronises with the host: every
data-dependent choice is a ``torch.where``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LARS does its arithmetic in: the param dtype, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def trust_ratio(
    w_norm: Tensor,
    grad: Tensor,
    weight: Tensor,
    *,
    weight_decay: float,
    eta: float,
    epsilon: float,
    trust_norm: str,
) -> Tensor:
    """The layer-wise trust ratio ``lam`` (0-d tensor) for one tensor.

    ``grad`` is the rescaled gradient ``rescale_grad * g`` (not clipped).

    * ``trust_norm="sum"``:    lam = eta * |w| / (|g| + wd * |w| + epsilon)
    * ``trust_norm="update"``: lam = eta * |w| / (|g + wd * w| + epsilon)

    Fallback (MXNet's rule, the same for both norms): lam = 1 (the plain lr, no eta) when
    |w| == 0 or |g| == 0, or when a norm is not finite. ("update" also falls back when
    |g + wd * w| == 0, so lam is always finite.)
    """
    g_norm = torch.linalg.vector_norm(grad, dtype=compute_dtype(grad.dtype))
    valid = (w_norm > 0) & (g_norm > 0) & torch.isfinite(w_norm) & torch.isfinite(g_norm)
    if trust_norm == "sum":
        denominator = g_norm + weight_decay * w_norm + epsilon
    else:
        update = grad + weight_decay * weight if weight_decay != 0 else grad
        u_norm = torch.linalg.vector_norm(update, dtype=compute_dtype(update.dtype))
        valid &= (u_norm > 0) & torch.isfinite(u_norm)
        denominator = u_norm + epsilon
    return torch.where(valid, eta * w_norm / denominator, torch.ones_like(w_norm))


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


def _updated(
    weight: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    lam: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    momentum_form: str,
    clip_gradient: float | None,
) -> tuple[Tensor, Tensor | None]:
    """New (weight, momentum buffer) from the rescaled gradient and the trust ratio."""
    dtype = weight.dtype
    update = grad
    if clip_gradient is not None:
        update = update.clamp(-clip_gradient, clip_gradient)
    if weight_decay != 0:
        update = update + weight_decay * weight
    if momentum == 0:
        return weight - (lr * lam).to(dtype) * update, None
    if momentum_form == "paper":
        # v = mu * v - lr * lam * g';  w += v   (nesterov: w += mu * v - lr * lam * g')
        step = (lr * lam).to(dtype) * update
        new_buf = momentum * buf.to(dtype) - step
        return weight + (momentum * new_buf - step if nesterov else new_buf), new_buf
    # b = mu * b + lam * g';  w -= lr * b   (nesterov: w -= lr * (lam * g' + mu * b))
    scaled = lam.to(dtype) * update
    new_buf = momentum * buf.to(dtype) + scaled
    return weight - lr * (scaled + momentum * new_buf if nesterov else new_buf), new_buf


def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    master_params: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    eta: float,
    epsilon: float,
    adapt: bool,
    nesterov: bool,
    momentum_form: str,
    trust_norm: str,
    trust_clip: bool,
    rescale_grad: float,
    clip_gradient: float | None,
    maximize: bool,
    norm_source: str,
    math_dtype: torch.dtype | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lazy_update: bool,
    stochastic_rounding: bool,
    generator: torch.Generator | None,
) -> None:
    """See :func:`larsopt.functional.lars` for the arguments and the formulas."""
    for i, param in enumerate(params):
        master = master_params[i]
        target = master if master is not None else param
        dtype = math_dtype if math_dtype is not None else compute_dtype(target.dtype)
        weight = target.to(dtype)

        # A float16/bfloat16 math_dtype (MXNet's kernels without master copies) rounds the update's
        # scalars to that dtype, as those kernels do; the trust ratio still reads float32 values.
        low_precision_math = dtype.itemsize < 4

        def in_math(value: float | None) -> float | None:
            return float(torch.tensor(value, dtype=dtype)) if low_precision_math and value is not None else value

        def prepared(grad: Tensor, as_dtype: torch.dtype, rescale: float) -> Tensor:
            grad = grad.to(as_dtype)
            if maximize:
                grad = -grad
            if grad_scale is not None:
                grad = grad / grad_scale.to(device=grad.device, dtype=as_dtype)
            return grad * rescale if rescale != 1.0 else grad

        def prepared_pair(grad: Tensor) -> tuple[Tensor, Tensor]:
            """(gradient for the update, gradient for the trust-ratio norm)."""
            for_update = prepared(grad, dtype, in_math(rescale_grad))
            if not low_precision_math:
                return for_update, for_update
            return for_update, prepared(grad, compute_dtype(dtype), rescale_grad)

        grad = grads[i]
        lazy_rows = None
        if grad.is_sparse and lazy_update:
            grad = grad.coalesce()  # sums duplicate indices
            lazy_rows = grad.indices()[0]
            grad_rows, norm_grad = prepared_pair(grad.values())
            if trust_norm == "update":  # |g| of the present rows is the dense |g|, but |g + wd * w| is not
                norm_grad = prepared_pair(grad.to_dense())[1]
        else:
            grad, norm_grad = prepared_pair(grad)  # dense (functional.lars densifies non-lazy sparse grads)

        if adapt:
            norm_input = param if norm_source == "param" else target
            w_norm = torch.linalg.vector_norm(norm_input, dtype=compute_dtype(norm_input.dtype))
            lam = trust_ratio(
                w_norm, norm_grad, weight, weight_decay=weight_decay, eta=eta, epsilon=epsilon, trust_norm=trust_norm
            )
            if trust_clip:
                lam = clip_trust_ratio(lam, lr)
        else:
            lam = torch.ones((), dtype=compute_dtype(dtype), device=param.device)

        buf = momentum_buffers[i]
        hyper = dict(
            lr=lr,
            weight_decay=in_math(weight_decay),
            momentum=in_math(momentum),
            nesterov=nesterov,
            momentum_form=momentum_form,
            clip_gradient=in_math(clip_gradient),
        )
        if lazy_rows is None:
            new_weight, new_buf = _updated(weight, grad, buf, lam, **hyper)
        else:
            # Lazy sparse update: only the rows present in the gradient change.
            row_buf = buf.index_select(0, lazy_rows) if buf is not None else None
            new_rows, new_buf_rows = _updated(weight.index_select(0, lazy_rows), grad_rows, row_buf, lam, **hyper)
            new_weight = weight.index_copy(0, lazy_rows, new_rows)
            new_buf = buf.to(dtype).index_copy(0, lazy_rows, new_buf_rows) if buf is not None else None

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
        if stochastic_rounding and master is None and param.dtype == torch.bfloat16:
            param.copy_(stochastic_round_to_bfloat16(new_weight, generator))
        else:
            param.copy_(new_weight)
