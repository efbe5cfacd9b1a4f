"""The multi-tensor path: the reference's math as ``torch._foreach_*`` ops over each group of
tensors sharing a device and dtypes, with the trust ratios of a whole group computed as one vector.

* |w|, |g| (and |g + wd * w| for ``trust_norm="update"``) of every tensor come from
  ``torch._foreach_norm`` calls stacked into vectors; lam for all tensors is one ``torch.where``.
* No tensor is converted to a Python number (no ``.item()``, ``bool()``, ``float()``): a tensor
  ``lr``, ``grad_scale`` and ``found_inf`` stay on the device, so the step needs no host
  synchronisation and is capturable.
* On CUDA the norms and element-wise ops are multi-tensor kernels; multiplying each tensor by its
  own trust ratio (a 0-d device tensor) has no multi-tensor kernel in torch and launches one
  kernel per tensor. On CPU the foreach ops run tensor by tensor and each one streams the whole
  group through memory, which is why ``auto`` prefers the fused kernel there.

Covers dense tensors, with or without a master copy, except ``math_dtype`` and bfloat16 params
without a master under stochastic rounding (see :func:`covers`); the caller sends the others to
the reference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from larsopt._impl.reference import compute_dtype
from larsopt._impl.support import is_plain


def covers(param: Tensor, grad: Tensor, master: Tensor | None, *, math_dtype: torch.dtype | None,
           stochastic_rounding: bool) -> bool:
    """Whether this path computes this tensor's step like the reference."""
    if not (is_plain(param) and is_plain(grad) and (master is None or is_plain(master))):
        return False  # a tensor subclass (DTensor) would run every foreach op through its own dispatch
    if math_dtype is not None or grad.is_sparse:
        return False
    # (a param with a master copy is written back by plain rounding, stochastic_rounding or not)
    return master is not None or not (stochastic_rounding and param.dtype == torch.bfloat16)


def _dtype(tensor: Tensor | None) -> torch.dtype | None:
    return None if tensor is None else tensor.dtype


def group_by_device_and_dtype(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor | None],
                              masters: Sequence[Tensor | None]) -> list[list[int]]:
    """Indices of ``params`` grouped by device and by the dtypes of param, grad, buffer and master
    (so that each list of a group converts, or not, as a whole), in first-seen order."""
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        key = (param.device, param.dtype, grads[i].dtype, _dtype(buffers[i]), _dtype(masters[i]))
        groups[key].append(i)
    return list(groups.values())


def _to_accelerator(device: torch.device) -> bool:
    """Copies of lr/grad_scale/found_inf onto ``device`` may be asynchronous (no host sync): the
    stream orders them before their use. A copy to the CPU must block, or the CPU ops that follow
    would read it before it arrives."""
    return device.type != "cpu"


def _trust_ratios(
    weights: list[Tensor],
    grads: list[Tensor],
    norm_weights: list[Tensor] | None,
    *,
    lr: float | Tensor,
    weight_decay: float,
    eta: float,
    epsilon: float,
    trust_norm: str,
    trust_clip: bool,
) -> Tensor:
    """lam of every tensor as one vector (reference.trust_ratio and clip_trust_ratio, batched).
    |w| is taken from ``norm_weights`` when given (norm_source="param": the params as stored)."""
    if norm_weights is None:
        w_norm = torch.stack(torch._foreach_norm(weights))
    else:
        w_norm = torch.stack(torch._foreach_norm(norm_weights, 2, dtype=compute_dtype(norm_weights[0].dtype)))
        w_norm = w_norm.to(weights[0].dtype)
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
    masters: list[Tensor] | None,
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
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One step for tensors of one device, dtype and master dtype. With ``masters`` the update is
    computed on them and the params get the result rounded, as in the reference."""
    targets = params if masters is None else masters
    dtype = compute_dtype(targets[0].dtype)
    device = params[0].device
    upcast = targets[0].dtype != dtype
    weights = [t.to(dtype) for t in targets] if upcast else targets

    # The rescaled gradient; the first op that changes it copies, so p.grad is never written.
    owned = grads[0].dtype != dtype
    grad = [g.to(dtype) for g in grads] if owned else list(grads)
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
        norm_weights = params if masters is not None and norm_source == "param" else None
        lam = _trust_ratios(weights, grad, norm_weights, lr=lr, weight_decay=weight_decay, eta=eta,
                            epsilon=epsilon, trust_norm=trust_norm, trust_clip=trust_clip)
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
        buffers_upcast = buffers[0].dtype != dtype
        new_buffers = [b.to(dtype) for b in buffers] if buffers_upcast else buffers
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
    if new_weights is not targets:
        torch._foreach_copy_(targets, new_weights)
    if masters is not None:
        torch._foreach_copy_(params, new_weights)
    if new_buffers is not None and new_buffers is not buffers:
        torch._foreach_copy_(buffers, new_buffers)


def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    master_params: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    **hyper: object,
) -> None:
    """Step tensors that :func:`covers` accepted, grouped by :func:`group_by_device_and_dtype`.
    ``hyper`` holds the remaining keyword arguments of :func:`larsopt.functional.lars` this path
    uses."""
    for group in group_by_device_and_dtype(params, grads, momentum_buffers, master_params):
        device = params[group[0]].device
        group_lr = lr.to(device, non_blocking=_to_accelerator(device)) if isinstance(lr, Tensor) else lr
        _group_step(
            [params[i] for i in group],
            [grads[i] for i in group],
            [momentum_buffers[i] for i in group],
            None if master_params[group[0]] is None else [master_params[i] for i in group],
            lr=group_lr,
            momentum=momentum,
            **hyper,
        )
