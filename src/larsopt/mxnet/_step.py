"""What the MXNet LARS front-ends (2.0 and 1.x) share below their bookkeeping: the arrays of one
update call checked and turned into tensors, and the calls into :func:`larsopt.functional.lars`.

Each front-end resolves its counters, lrs, weight decays and momentum into one
:class:`~larsopt.options.LarsOptions` per weight; :func:`run` steps the weights that share options
with one core call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from larsopt import functional
from larsopt.mxnet import _arrays
from larsopt.mxnet.optimizer import Index
from larsopt.options import LarsOptions


class Member(NamedTuple):
    """One weight of an update call, resolved into what the functional core takes."""

    param: Tensor
    grad: Tensor
    momentum_buffer: Tensor | None
    master: Tensor | None
    #: dtype of the update arithmetic: float16 for float16 weights without a master (MXNet's
    #: float16 kernels compute in float16), else ``None`` (the core's default).
    math_dtype: torch.dtype | None


def resolve(index: Index, weight: Any, grad: Any, state: Any, *, multi_precision: bool,
            pair: tuple[str, str]) -> Member:
    """Torch views of one weight's arrays, checked.

    ``pair`` is the order of the two entries of a float16 weight's state under
    ``multi_precision``: ``("master", "momentum")`` in MXNet 2.0, ``("momentum", "master")`` in 1.x.

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
    if multi_precision and param.dtype == torch.float16:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError(f"state of float16 index {index!r} under multi_precision must be the "
                             f"({pair[0]}, {pair[1]}) pair of create_state_multi_precision, got "
                             f"{type(state).__name__}")
        entries = dict(zip(pair, state))
        master = state_tensor(entries["master"], f"master weight of index {index!r}", param)
        state = entries["momentum"]
    buffer = None if state is None else state_tensor(state, f"state of index {index!r}", param)
    math_dtype = torch.float16 if param.dtype == torch.float16 and master is None else None
    return Member(param, grad_tensor, buffer, master, math_dtype)


def state_tensor(state: Any, what: str, param: Tensor) -> Tensor:
    """A state array as a tensor updated in place; it must be dense, floating and of the weight's
    shape (the same number of elements in another shape is an error too)."""
    tensor = _arrays.as_tensor(state, what, writable=True)
    _arrays.check_floating(tensor, what)
    if tensor.layout != torch.strided:
        raise TypeError(f"{what} must be dense, got layout {tensor.layout}")
    if tensor.shape != param.shape:
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, its weight {tuple(param.shape)}; "
                         "a state must have its weight's shape (create it with create_state)")
    return tensor


@torch.no_grad()
def run(members: Sequence[Member], options: Sequence[LarsOptions],
        check: Callable[[LarsOptions], LarsOptions]) -> None:
    """Step each member with its options: one core call per distinct options, each checked once
    with ``check`` (which raises ``ValueError`` naming a bad value) before any call is made.

    Runs without autograd: the weights may be a model's parameters (leaves that require grad).
    """
    groups: dict[LarsOptions, list[Member]] = {}
    for member, member_options in zip(members, options):
        groups.setdefault(member_options, []).append(member)
    for group_options in groups:
        check(group_options)
    for group_options, group in groups.items():
        functional.lars(
            [member.param for member in group],
            [member.grad for member in group],
            [member.momentum_buffer for member in group],
            group_options,
            master_params=[member.master for member in group],
        )
