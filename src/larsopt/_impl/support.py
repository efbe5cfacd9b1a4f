"""What the fast paths can serve, shared by their ``covers()`` rules."""

from __future__ import annotations

from torch import Tensor
from torch.nn import Parameter

_PLAIN_TYPES = (Tensor, Parameter)


def is_plain(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a plain tensor or parameter, whose storage the fast paths read and write
    directly. Subclasses (DTensor, whose ``data_ptr()`` is 0, functorch wrappers, ...) are not, as
    torch's own fused optimizers decide."""
    return type(tensor) in _PLAIN_TYPES
