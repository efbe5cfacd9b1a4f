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
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from larsopt._impl.norms import compute_dtype, sums_of_squares
from larsopt._impl.reference import ratios_from_sums, stats_rows, unadapted_stats
from larsopt._impl.support import is_plain
from larsopt.options import ANY, LarsOptions


#: What this path computes exactly like the reference (other values go to the reference).
SUPPORTED = {
    **{name: ANY for name in ("lr", "momentum", "eta", "epsilon", "weight_decay", "adapt", "nesterov", "trust_clip",
                              "rescale_grad", "clip_gradient", "maximize", "norm_source", "lazy_update",
                              "stochastic_rounding")},
    "momentum_form": ("paper", "torch"),
    "trust_norm": ("sum", "update"),
    "math_dtype": (None,),
}


def covers(param: Tensor, grad: Tensor, master: Tensor | None, options: LarsOptions) -> bool:
    """Whether this path computes this tensor's step like the reference (given :data:`SUPPORTED`)."""
    if not (is_plain(param) and is_plain(grad) and (master is None or is_plain(master))):
        return False  # a tensor subclass (DTensor) would run every foreach op through its own dispatch
    if grad.is_sparse:
        return False
    # (a param with a master copy is written back by plain rounding, stochastic_rounding or not)
    return master is not None or not (options.stochastic_rounding and param.dtype == torch.bfloat16)


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


class _Group:
    """The tensors of one device and dtypes, between the two phases of a step: the rescaled
    gradients are made (and their sums of squares taken) before any ratio, then updated."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], buffers: list[Tensor | None],
                 masters: list[Tensor] | None, options: LarsOptions, grad_scale: Tensor | None) -> None:
        self.params, self.buffers, self.masters = params, buffers, masters
        self.targets = params if masters is None else masters
        self.dtype = dtype = compute_dtype(self.targets[0].dtype)
        self.device = device = params[0].device
        self.upcast = self.targets[0].dtype != dtype
        self.weights = [t.to(dtype) for t in self.targets] if self.upcast else self.targets

        # The rescaled gradient; the first op that changes it copies, so p.grad is never written.
        owned = grads[0].dtype != dtype
        grad = [g.to(dtype) for g in grads] if owned else list(grads)
        if options.maximize:
            grad, owned = torch._foreach_neg(grad), True
        if grad_scale is not None:
            grad = torch._foreach_div(grad, grad_scale.to(device=device, dtype=dtype,
                                                              non_blocking=_to_accelerator(device)))
            owned = True
        if options.rescale_grad != 1.0:
            grad = torch._foreach_mul(grad, options.rescale_grad)
            owned = True
        self.grad, self.owned = grad, owned

    def sums(self, options: LarsOptions) -> Tensor:
        """(|w|^2, |g|^2, |g + wd * w|^2) of every tensor, one row each. |w| is taken from the params
        as stored under norm_source="param" with master copies."""
        norm_weights = self.params if self.masters is not None and options.norm_source == "param" else self.weights
        w_sums = sums_of_squares(norm_weights)
        g_sums = sums_of_squares(self.grad)
        if options.trust_norm == "update" and options.weight_decay != 0:
            u_sums = sums_of_squares(torch._foreach_add(self.grad, self.weights, alpha=options.weight_decay))
        else:
            u_sums = g_sums  # g + 0 * w is g (and "sum" does not read it)
        return torch.stack([w_sums, g_sums, u_sums], dim=1)

    def finish(self, rows: list[int], sums: Tensor | None, options: LarsOptions, found_inf: Tensor | None,
               stats: Tensor | None) -> None:
        """The trust ratios from ``sums`` (``None``: lam = 1, the group does not adapt), the stats rows
        ``rows`` of ``stats``, and the update."""
        device = self.device
        lr = options.lr
        if isinstance(lr, Tensor):
            lr = lr.to(device, non_blocking=_to_accelerator(device))
            options = replace(options, lr=lr)
        if sums is None:
            lam = torch.ones(len(rows), dtype=self.dtype, device=device)
        else:
            lam = ratios_from_sums(sums, options, self.dtype)
        if stats is not None:
            group_stats = stats_rows(sums, lam) if sums is not None else unadapted_stats(len(rows), device)
            stats[rows] = group_stats.to(stats.device)
        self._update(options, lr, lam, found_inf)

    def _update(self, options: LarsOptions, lr: float | Tensor, lam: Tensor, found_inf: Tensor | None) -> None:
        """Apply the step with trust ratios ``lam`` (one per tensor, in the compute dtype)."""
        dtype, device, upcast, weights = self.dtype, self.device, self.upcast, self.weights
        buffers, momentum, owned = self.buffers, options.momentum, self.owned
        update = self.grad
        if options.clip_gradient is not None:
            update = torch._foreach_clamp_min(update, -options.clip_gradient)
            torch._foreach_clamp_max_(update, options.clip_gradient)
            owned = True
        if options.weight_decay != 0:
            if owned:
                torch._foreach_add_(update, weights, alpha=options.weight_decay)
            else:
                update = torch._foreach_add(update, weights, alpha=options.weight_decay)

        skip = found_inf.to(device, non_blocking=_to_accelerator(device)) > 0 if found_inf is not None else None
        old_weights = [w.clone() for w in weights] if skip is not None else None
        old_buffers = None
        if momentum == 0:
            # w = w - (lr * lam) * g'
            steps = torch._foreach_mul(update, (lr * lam).to(dtype).unbind())
            new_weights = _subtracted(weights, steps, in_place=not upcast)
            new_buffers = None
        else:
            buffers_upcast = buffers[0].dtype != dtype
            new_buffers = [b.to(dtype) for b in buffers] if buffers_upcast else buffers
            if skip is not None:
                old_buffers = [b.clone() for b in new_buffers]
            torch._foreach_mul_(new_buffers, momentum)
            if options.momentum_form == "paper":
                # v = mu * v - lr * lam * g';  w += v   (nesterov: w += mu * v - lr * lam * g')
                steps = torch._foreach_mul(update, (lr * lam).to(dtype).unbind())
                torch._foreach_sub_(new_buffers, steps)
                if options.nesterov:
                    direction = torch._foreach_mul(new_buffers, momentum)
                    torch._foreach_sub_(direction, steps)
                else:
                    direction = new_buffers
                new_weights = _added(weights, direction, in_place=not upcast)
            else:
                # b = mu * b + lam * g';  w -= lr * b   (nesterov: w -= lr * (lam * g' + mu * b))
                scaled = torch._foreach_mul(update, lam.to(dtype).unbind())
                torch._foreach_add_(new_buffers, scaled)
                if options.nesterov:
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
        if new_weights is not self.targets:
            torch._foreach_copy_(self.targets, new_weights)
        if self.masters is not None:
            torch._foreach_copy_(self.params, new_weights)
        if new_buffers is not None and new_buffers is not buffers:
            torch._foreach_copy_(buffers, new_buffers)


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


def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    master_params: Sequence[Tensor | None],
    options: LarsOptions,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stats: Tensor | None = None,
    reduce_sums: Callable[[Tensor], Tensor] | None = None,
) -> list[int]:
    """Step the tensors :func:`covers` accepts, grouped by :func:`group_by_device_and_dtype`, and
    return the indices of the others, untouched; the arguments are those of
    :func:`larsopt._impl.reference.lars_step`. With ``reduce_sums``, every group's sums are taken
    first and reduced together, once."""
    rest = [i for i, param in enumerate(params) if not covers(param, grads[i], master_params[i], options)]
    if rest:
        skipped = set(rest)
        covered = [i for i in range(len(params)) if i not in skipped]
        indices = [[covered[k] for k in group] for group in group_by_device_and_dtype(
            [params[i] for i in covered], [grads[i] for i in covered], [momentum_buffers[i] for i in covered],
            [master_params[i] for i in covered])]
    else:
        indices = group_by_device_and_dtype(params, grads, momentum_buffers, master_params)

    def group(rows: list[int]) -> _Group:
        masters = None if master_params[rows[0]] is None else [master_params[i] for i in rows]
        return _Group([params[i] for i in rows], [grads[i] for i in rows], [momentum_buffers[i] for i in rows],
                      masters, options, grad_scale)

    if reduce_sums is None or not options.adapt:
        for rows in indices:  # one group at a time: only one group's rescaled gradients exist at once
            one = group(rows)
            one.finish(rows, one.sums(options) if options.adapt else None, options, found_inf, stats)
        return rest
    if not indices:
        return rest  # (the same on every rank: coverage depends on dtypes, layouts and options only)
    groups = [group(rows) for rows in indices]
    sums = reduce_sums(torch.cat([one.sums(options) for one in groups]))
    for one, rows, group_sums in zip(groups, indices, sums.split([len(rows) for rows in indices])):
        one.finish(rows, group_sums, options, found_inf, stats)
    return rest
