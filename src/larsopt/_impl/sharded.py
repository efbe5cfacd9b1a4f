"""Sharded params (DTensor: FSDP2, HSDP, tensor parallel): the step runs on the local shards, with the
norms of the full tensors.

Each tensor's sums of squares are taken over its local shard (0 for an empty shard), stacked for all
tensors of a call that are sharded over the same mesh dims, and summed with one all-reduce per mesh dim
that shards them (never over a dim that replicates them: that would count each value again). The trust
ratios, and the zero-norm fallback, are taken only after that reduction, so every rank applies the
ratio of the whole tensor; the update then runs on the local shards with the ordinary paths (fused
CPU kernel, foreach), as fast per element as an unsharded step. The paths see contiguous local shards
(a copy for the rare shard that is not), so every rank sends each tensor down the same path and makes
the same collectives: per call, one per path used (usually one) and sharding mesh dim, however many
tensors it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import weakref
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is ever sharded
    DTensor = None


def possible() -> bool:
    """Whether a DTensor can exist here: they need an initialised process group (checked once per
    call, so that unsharded training pays nothing per tensor)."""
    return DTensor is not None and dist.is_available() and dist.is_initialized()


def is_sharded(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


@dataclass
class Part:
    """The tensors of one call that step together: ``indices`` into the caller's lists, the tensors
    the paths see (local shards for DTensors), and the reduction of their sums (``None``: none)."""

    indices: list[int]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    buffers: list[Tensor | None] = field(default_factory=list)
    masters: list[Tensor | None] = field(default_factory=list)
    reduce_sums: Callable[[Tensor], Tensor] | None = None
    #: (local shard, contiguous copy the step updates) for shards that are not contiguous
    write_back: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def working(self, local: Tensor | None, read_only: bool = False) -> Tensor | None:
        """``local`` as the paths see it: contiguous on every rank, so that which path serves a tensor
        (and so which collective reduces its sums) never depends on one rank's layout."""
        if local is None or local.is_contiguous():
            return local
        copy = local.contiguous()
        if not read_only:
            self.write_back.append((local, copy))
        return copy

    def finish(self) -> None:
        """Copy the updated contiguous copies back into their shards."""
        for local, copy in self.write_back:
            local.copy_(copy)


def _summed_over(mesh_dims: tuple[int, ...], mesh: object) -> Callable[[Tensor], Tensor]:
    groups = [mesh.get_group(dim) for dim in mesh_dims]

    def reduce_sums(sums: Tensor) -> Tensor:
        for group in groups:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    return reduce_sums


def _local(tensor: Tensor | None, param: Tensor, what: str, label: str) -> Tensor | None:
    """The local shard of ``tensor`` (the grad, buffer or master of DTensor ``param``)."""
    if tensor is None:
        return None
    if not is_sharded(tensor):
        raise ValueError(f"param {label} is a DTensor and its {what} is a {type(tensor).__name__}; the {what} of a "
                         "sharded param must be a DTensor with the param's mesh and placements")
    if tensor.device_mesh != param.device_mesh or tuple(tensor.placements) != tuple(param.placements):
        raise ValueError(f"param {label} has placements {tuple(param.placements)} on {param.device_mesh} and its "
                         f"{what} {tuple(tensor.placements)} on {tensor.device_mesh}; they must be the same (a "
                         "Partial gradient must be reduced before the step)")
    return tensor.to_local()


def parts(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor | None],
          masters: Sequence[Tensor | None], label: Callable[[int], str]) -> list[Part]:
    """Split a call into its plain tensors (first, unreduced) and one part per set of sharding mesh
    dims of its DTensors (``Shard(0)`` and ``Shard(1)`` on the same mesh dim share one reduction).
    ``label(i)`` names param ``i`` in errors."""
    plain = Part([])
    sharded: dict[tuple[object, ...], Part] = {}
    mesh = None
    for i, param in enumerate(params):
        if not is_sharded(param):
            plain.indices.append(i)
            continue
        name = label(i)
        placements = tuple(param.placements)
        if any(placement.is_partial() for placement in placements):
            raise ValueError(f"param {name} has a Partial placement {placements}; LARS needs its values, not "
                             "pending sums: redistribute it to Shard or Replicate")
        if mesh is not None and param.device_mesh != mesh:
            raise ValueError(f"param {name} is on {param.device_mesh} and an earlier param of the same group on "
                             f"{mesh}; put the params of different meshes in different param groups")
        mesh = param.device_mesh
        if grads[i].is_sparse or (is_sharded(grads[i]) and grads[i].to_local().is_sparse):
            raise ValueError(f"param {name} is a DTensor with a sparse gradient; sparse rows of a sharded tensor "
                             "are not supported: use a dense gradient")
        dims = tuple(dim for dim, placement in enumerate(placements) if placement.is_shard())
        part = sharded.get(dims)
        if part is None:
            part = sharded[dims] = Part([], reduce_sums=_summed_over(dims, mesh) if dims else None)
        part.indices.append(i)
        part.params.append(part.working(param.to_local()))
        part.grads.append(part.working(_local(grads[i], param, "gradient", name), read_only=True))
        part.buffers.append(part.working(_local(buffers[i], param, "momentum buffer", name)))
        part.masters.append(part.working(_local(masters[i], param, "master copy", name)))
    for items, target in ((params, plain.params), (grads, plain.grads), (buffers, plain.buffers),
                          (masters, plain.masters)):
        target.extend(items[i] for i in plain.indices)
    return ([plain] if plain.indices else []) + list(sharded.values())


_last_found_inf: tuple[weakref.ref, int, Tensor] | None = None


def reduce_found_inf(found_inf: Tensor | None, params: Sequence[Tensor]) -> Tensor | None:
    """AMP's inf flag over every rank of the sharded params' mesh: a step is skipped on all ranks or
    on none (each rank checked only its own shards). The param groups of one step share the same flag
    tensor: it is reduced once, for the first group, and reused while it is unchanged."""
    global _last_found_inf
    if found_inf is None:
        return None
    if _last_found_inf is not None:
        flag, version, reduced = _last_found_inf
        if flag() is found_inf and version == found_inf._version:
            return reduced
    mesh = next(param.device_mesh for param in params if is_sharded(param))
    reduced = found_inf.clone()
    for dim in range(mesh.ndim):
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    _last_found_inf = (weakref.ref(found_inf), found_inf._version, reduced)
    return reduced
