"""What the fast paths can serve, shared by their ``covers()`` rules."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

#: The tensor types whose storage the fast paths read and write directly.
PLAIN_TYPES = (Tensor, Parameter)
_transform_level = torch._C._functorch.maybe_current_level
_is_wrapper = torch._C._functorch.is_functorch_wrapped_tensor


def transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...) is running: its tensors
    are wrappers, of type ``Tensor``, whose storage no fast path may read or write (the fast
    paths' ops have no batching rules, and the kernel would write behind the transform)."""
    return _transform_level() is not None


def is_plain(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a plain tensor or parameter, whose storage the fast paths read and write
    directly. Subclasses (DTensor, whose ``data_ptr()`` is 0, ...) are not, as torch's own fused
    optimizers decide, and neither are the wrappers of a running ``torch.func`` transform."""
    return type(tensor) in PLAIN_TYPES and (_transform_level() is None or not _is_wrapper(tensor))
