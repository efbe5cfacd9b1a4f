"""Torch views of the arrays the MXNet front-end accepts (torch tensors and numpy arrays)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def as_tensor(array: Any, what: str, *, writable: bool) -> Tensor:
    """A tensor sharing memory with ``array`` (a torch tensor or a numpy array).

    ``writable``: the caller will update it in place, so a read-only numpy array is an error;
    otherwise a read-only array is copied (torch cannot view it).
    """
    if isinstance(array, Tensor):
        return array
    if isinstance(array, np.ndarray):
        if not array.flags.writeable:
            if writable:
                raise ValueError(f"{what} is a read-only numpy array; it is updated in place, so it must be writable")
            array = array.copy()
        return torch.from_numpy(array)
    raise TypeError(f"{what} must be a torch.Tensor or a numpy.ndarray, got {type(array).__name__}")


def check_floating(array: Any, what: str) -> None:
    """``array`` must be a floating-point tensor or numpy array: the update is fractional, so an
    integer array would be truncated (MXNet's kernels, too, take floating-point types only)."""
    dtype = torch_dtype(array) if isinstance(array, (Tensor, np.ndarray)) else None
    if dtype is None:
        raise TypeError(f"{what} must be a torch.Tensor or a numpy.ndarray, got {type(array).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"{what} has dtype {dtype}; LARS updates floating-point arrays only (float16, bfloat16, "
                        "float32, float64)")


def zeros_like(array: ArrayLike, dtype: torch.dtype | None = None) -> ArrayLike:
    """Zeros of ``array``'s shape and kind (tensor on the same device, or numpy array)."""
    if isinstance(array, np.ndarray):
        np_dtype = array.dtype if dtype is None else torch.empty((), dtype=dtype).numpy().dtype
        return np.zeros(array.shape, dtype=np_dtype)
    return torch.zeros(array.shape, dtype=array.dtype if dtype is None else dtype, device=array.device)


def to_dtype(array: ArrayLike, dtype: torch.dtype) -> ArrayLike:
    """A new array of ``array``'s kind with the values cast to ``dtype`` (always a copy)."""
    if isinstance(array, np.ndarray):
        return as_tensor(array, "array", writable=False).to(dtype, copy=True).numpy()
    return array.detach().to(dtype=dtype, copy=True)


def torch_dtype(array: ArrayLike) -> torch.dtype:
    """The torch dtype of a tensor or numpy array."""
    if isinstance(array, Tensor):
        return array.dtype
    return torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype


def device_id(array: ArrayLike) -> int:
    """MXNet's ``context.device_id``: the accelerator index, 0 for the CPU and numpy."""
    if isinstance(array, Tensor) and array.device.index is not None:
        return array.device.index
    return 0
