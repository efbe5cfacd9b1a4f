"""The multi-tensor path: the reference's math as ``torch._foreach_*`` ops over each (device, dtype)
group, with the trust ratios of a whole group computed as one vector.

* |w|, |g| (and |g + wd * w| for ``trust_norm="update"``) of every tensor come from
  ``torch._foreach_norm`` calls stacked into vectors; lam for all tensors is one ``torch.where``.
* No tensor is converted to a Python number (no ``.item()``, ``bool()``, ``float()``): a tensor
  ``lr``, ``grad_scale`` and ``found_inf`` stay on the device, so the step needs no host
  synchronisation and is capturable.
* The number of kernel launches per group does not depend on the number of tensors on devices
  with fused foreach kernels (CUDA). On CPU the foreach ops run tensor by tensor and each one
  streams the whole group through memory, which is why ``auto`` prefers the fused kernel there.

Covers dense tensors without a master copy, ``math_dtype`` or stochastic rounding (see
:func:`covers`); the caller sends the others to the reference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from larsopt._impl.reference import compute_dtype


def covers(param: Tensor, grad: Tensor, master: Tensor | None, *, math_dtype: torch.dtype | None,
           stochastic_rounding: bool) -> bool:
    """Whether this path computes this tensor's step like the reference."""
    if master is not None or math_dtype is not None or grad.is_sparse:
        return False
    return not (stochastic_rounding and param.dtype == torch.bfloat16)


def group_by_device_and_dtype(indices: Sequence[int], params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i in indices:
        groups[(params[i].device, params[i].dtype)].append(i)
    return list(groups.values())


def _to_accelerator(device: torch.device) -> bool:
    """Copies of lr/grad_scale/found_inf onto ``device`` may be asynchronous (no host sync): the
    stream orders them before their use. A copy to the CPU must block, or the CPU ops that follow
    would read it before it arrives."""
    return device.type != "cpu"


def _trust_ratios(
    weights: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    eta: float,
    epsilon: float,
    trust_norm: str,
    trust_clip: bool,
) -> Tensor:
    """lam of every tensor as one vector (reference.trust_ratio and clip_trust_ratio, batched)."""
    w_norm = torch.stack(torch._foreach_norm(weights))
    g_norm = torch.stack(torch._foreach_norm(grads))
    valid = (w_norm > 0) & (g_norm > 0) & torch.isfinite(w_norm) & torch.isfinite(g_norm)
    if trust_norm == "sum":
        denominator = g_norm + weight_decay * w_norm + epsilon
    else:
        if weight_decay != 0:
            u_norm = torch.stack(torch._foreach_norm(torch._foreach_add(grads, weights, alpha=weight_decay)))
        else:
            u_norm = g_norm
        valid &= (u_norm > 0) & torch.isfinite(u_norm)
        denominator = u_norm + epsilon
    lam = torch.where(valid, eta * w_norm / denominator, torch.ones_like(w_norm))
    if trust_clip:
        lam = torch.where(lam < lr, lam / lr, torch.ones_like(lam))
    return lam


def _added(weights: list[Tensor], direction: list[Tensor], *, in_place: bool) -> list[Tensor]:
    if not in_place:
        return torch._foreach_add(weights, direction)
    torch._foreach_add_(weights, direction)
    return weights


def _subtracted(weights: list[Tensor], direction: list[Tensor], *, in_place: bool) -> list[Tensor]:
    if not in_place:
        return torch._foreach_sub(weights, direction)
    torch._foreach_sub_(weights, direction)
    return weights


def _group_step(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
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
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One step for tensors of one device and dtype."""
    dtype = compute_dtype(params[0].dtype)
    device = params[0].device
    upcast = params[0].dtype != dtype
    weights = [p.to(dtype) for p in params] if upcast else params

    # The rescaled gradient; the first op that changes it copies, so p.grad is never written.
    grad = [g.to(dtype) for g in grads] if upcast else list(grads)
    owned = upcast
    if maximize:
        grad, owned = torch._foreach_neg(grad), True
    if grad_scale is not None:
        grad = torch._foreach_div(grad, grad_scale.to(device=device, dtype=dtype,
                                                          non_blocking=_to_accelerator(device)))
        owned = True
    if rescale_grad != 1.0:
        grad = torch._foreach_mul(grad, rescale_grad)
        owned = True

    if adapt:
        lam = _trust_ratios(weights, grad, lr=lr, weight_decay=weight_decay, eta=eta, epsilon=epsilon,
                            trust_norm=trust_norm, trust_clip=trust_clip)
    else:
        lam = torch.ones(len(params), dtype=dtype, device=device)

    update = grad
    if clip_gradient is not None:
        update = torch._foreach_clamp_min(update, -clip_gradient)
        torch._foreach_clamp_max_(update, clip_gradient)
        owned = True
    if weight_decay != 0:
        if owned:
            torch._foreach_add_(update, weights, alpha=weight_decay)
        else:
            update = torch._foreach_add(update, weights, alpha=weight_decay)
            owned = True

    skip = found_inf.to(device, non_blocking=_to_accelerator(device)) > 0 if found_inf is not None else None
    old_weights = [w.clone() for w in weights] if skip is not None else None
    old_buffers = None
    if momentum == 0:
        # w = w - (lr * lam) * g'
        step_sizes = (lr * lam).to(dtype).unbind()
        steps = torch._foreach_mul(update, step_sizes)
        new_weights = _subtracted(weights, steps, in_place=not upcast)
        new_buffers = None
    else:
        new_buffers = [b.to(dtype) for b in buffers] if upcast else buffers
        if skip is not None:
            old_buffers = [b.clone() for b in new_buffers]
        torch._foreach_mul_(new_buffers, momentum)
        if momentum_form == "paper":
            # v = mu * v - lr * lam * g';  w += v   (nesterov: w += mu * v - lr * lam * g')
            steps = torch._foreach_mul(update, (lr * lam).to(dtype).unbind())
            torch._foreach_sub_(new_buffers, steps)
            if nesterov:
                direction = torch._foreach_mul(new_buffers, momentum)
                torch._foreach_sub_(direction, steps)
            else:
                direction = new_buffers
            new_weights = _added(weights, direction, in_place=not upcast)
        else:
            # b = mu * b + lam * g';  w -= lr * b   (nesterov: w -= lr * (lam * g' + mu * b))
            scaled = torch._foreach_mul(update, lam.to(dtype).unbind())
            torch._foreach_add_(new_buffers, scaled)
            if nesterov:
                direction = torch._foreach_mul(new_buffers, momentum)
                torch._foreach_add_(direction, scaled)
            else:
                direction = new_buffers
            direction = torch._foreach_mul(direction, lr)
            new_weights = _subtracted(weights, direction, in_place=not upcast)

    if skip is not None:
        # AMP: an inf/NaN gradient anywhere leaves every tensor as it was, without a host sync.
        new_weights = [torch.where(skip, old, new) for old, new in zip(old_weights, new_weights)]
        if new_buffers is not None:
            new_buffers = [torch.where(skip, old, new) for old, new in zip(old_buffers, new_buffers)]
        torch._foreach_copy_(params, new_weights)
        if new_buffers is not None:
            torch._foreach_copy_(buffers, new_buffers)
    elif upcast:
        torch._foreach_copy_(params, new_weights)
        if new_buffers is not None:
            torch._foreach_copy_(buffers, new_buffers)


def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    **hyper: object,
) -> None:
    """Step tensors that :func:`covers` accepted, grouped by device and dtype. ``hyper`` holds the
    remaining keyword arguments of :func:`larsopt.functional.lars` this path uses."""
    for group in group_by_device_and_dtype(range(len(params)), params):
        device = params[group[0]].device
        group_lr = lr.to(device, non_blocking=_to_accelerator(device)) if isinstance(lr, Tensor) else lr
        _group_step(
            [params[i] for i in group],
            [grads[i] for i in group],
            [momentum_buffers[i] for i in group],
            lr=group_lr,
            momentum=momentum,
            **hyper,
        )
