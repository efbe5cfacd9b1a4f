"""Per-tensor sums of squares: the one place a LARS step takes its norms.

Every path gets |w|^2, |g|^2 (and |g + wd * w|^2) of its tensors as one stacked float64 vector
(float64 so that summing several shards' values never overflows or loses digits), then derives
the trust ratios from the vector. That vector is where a sharded step reduces its local sums
across processes, once per step, before any ratio is taken (``reduce_sums`` of the paths).

The sums accumulate in float64 (or an equivalent), never in float32: torch's float32 CPU norm of
50M values is 0.4% off, and a finite float32 tensor with entries around 1e20 has a sum of
squares float32 cannot hold, which would send it to the "norm not finite" fallback (lam = 1)
where its true trust ratio is tiny. Every finite float32/bfloat16/float16 tensor gets a finite,
accurate sum; an inf or NaN entry still gives inf/NaN. (A float64 tensor whose sum of squares
exceeds float64's range, entries around 1e154, stays inf.)

* CPU: the fused kernel's ``larsopt_sums_of_squares`` (float blocks of 1024 added in double, a
  block widened to double where it overflows or underflows): one pass, no copy, about the speed
  of torch's float32 norm.
* CUDA and other devices: ``torch._foreach_norm(..., dtype=float64)``, sync-free and capturable
  (whether its CUDA kernel accumulates in float64 without a copy has not been measured on a GPU). Devices without
  float64 (MPS) accumulate in float32.
* Under a ``torch.func`` transform (``vmap``, ``grad``): ``torch.linalg.vector_norm`` per tensor,
  which every transform supports.
* CPU without the kernel (no compiler), or tensors it cannot read (autograd has to see them,
  tensor subclasses): ``_foreach_norm(..., dtype=float64)``, which on CPU converts each tensor
  to float64 first (exact, and about 25x slower than the kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from larsopt._impl.support import transform_active

SUMS_DTYPE = torch.float64
_NO_FLOAT64 = ("mps",)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LARS does its arithmetic in: the param dtype, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def sums_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """The sums of squares of ``tensors`` (all of one dtype and device), stacked as a float64 vector,
    accumulated in float64 (see the module docstring for how, per device)."""
    # (imported here: the kernel's module imports this one)
    from larsopt._impl import fused_cpu

    tensors = list(tensors)
    native = fused_cpu.sums_of_squares(tensors)
    if native is not None:
        return native
    device = tensors[0].device
    accumulate = compute_dtype(tensors[0].dtype) if device.type in _NO_FLOAT64 else SUMS_DTYPE
    if not torch.compiler.is_compiling() and transform_active():
        norms = [torch.linalg.vector_norm(t, dtype=accumulate) for t in tensors]
    else:
        norms = torch._foreach_norm(tensors, 2, dtype=accumulate)
    return torch.stack(norms).to(SUMS_DTYPE).square()
