"""Per-tensor sums of squares: the one place a LARS step takes its norms.

Every path gets |w|^2, |g|^2 (and |g + wd * w|^2) of its tensors as one stacked float64 vector
(float64 so that summing several shards' values, or squaring a finite float32 norm, never
overflows or loses digits), then derives the trust ratios from the vector. That vector is where
a sharded step reduces its local sums across processes, once per step, before any ratio is
taken (``reduce_sums`` of the paths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SUMS_DTYPE = torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LARS does its arithmetic in: the param dtype, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def sums_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """The sums of squares of ``tensors`` (all of one dtype and device), stacked as a float64 vector.

    The norms accumulate in the tensors' compute dtype (at least float32); the square of a norm
    in float64 is exact, so its square root gives that norm back bit for bit."""
    norms = torch._foreach_norm(list(tensors), 2, dtype=compute_dtype(tensors[0].dtype))
    return torch.stack(norms).to(SUMS_DTYPE).square()
