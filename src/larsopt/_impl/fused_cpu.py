"""The fused CPU path: one native call per dtype runs the whole LARS step (``lars_cpu.cpp``).

Why a small C++ kernel and not torch.compile: on CPU a LARS step is memory-bound, and the kernel
does each tensor's two passes (norms, then update) back to back, so the second pass reads the
weight and gradient from cache; the DRAM traffic of a cache-sized tensor is then SGD's 20
bytes/param. It builds with the system C++ compiler in about a second and is cached on disk;
inductor needed 37-40 s to compile a foreach LARS over ResNet-50's 161 tensors and reached only
about 2x torch's fused SGD (``docs/performance.md`` has the measurements).

The kernel covers dense, contiguous (or equally strided, non-overlapping) CPU tensors of dtype
float32, float64 or bfloat16 with no master copy, no ``math_dtype`` and no stochastic rounding;
everything else is handed back to the caller (see :func:`covers`). It reads ``lr``,
``grad_scale`` and ``found_inf`` from their tensors inside the call, so no tensor is ever
converted to a Python number.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from larsopt._impl.support import is_plain

_SOURCE = Path(__file__).with_name("lars_cpu.cpp")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_SCALAR_KINDS = {torch.float32: 1, torch.float64: 2}
_FORMS = {"paper": 1, "torch": 2}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]

_library: ctypes.CDLL | None = None
_library_error: str | None = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/larsopt`` (``~/.cache/larsopt``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "larsopt"


def _build(compiler: str, source: bytes) -> Path:
    """Compile the kernel (once per source, compiler, flags and CPU) and return the library path.

    The name hashes everything the binary depends on, because ``-march=native`` makes it specific
    to this CPU; the file is written under a temporary name and renamed, so processes building
    at the same time (one per rank) never load a half-written library.
    """
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), cpu.encode()])).hexdigest()[:20]
    directory = _cache_dir()
    library = directory / f"lars_cpu_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, library)
    return library


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use; ``None`` when it cannot be built here (no compiler,
    not an x86/ARM Linux/macOS toolchain, source missing). :func:`unavailable_reason` says why."""
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    with _lock:
        if _library is not None or _library_error is not None:
            return _library
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            if sys.platform == "win32":
                raise RuntimeError("the fused CPU kernel is built with gcc/clang flags; Windows is not supported")
            library = ctypes.CDLL(str(_build(compiler, _SOURCE.read_bytes())))
            function = library.larsopt_lars_step
            function.restype = ctypes.c_int
            function.argtypes = [
                ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ]
            _library = library
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            _library_error = f"{type(error).__name__}: {detail}".strip()
    return _library


def unavailable_reason() -> str | None:
    """Why the kernel could not be built (``None`` if it was, or was not tried yet)."""
    return _library_error


def _same_layout(param: Tensor, other: Tensor) -> bool:
    return other.dtype == param.dtype and other.shape == param.shape and other.stride() == param.stride() \
        and other.is_cpu and not other.is_sparse


def covers(param: Tensor, grad: Tensor, buf: Tensor | None, master: Tensor | None, *, math_dtype: torch.dtype | None,
           stochastic_rounding: bool) -> bool:
    """Whether the kernel computes this tensor's step exactly like the reference.

    The kernel walks the storage of param, grad and buffer as flat arrays in the same order, so
    they must be dense and laid out alike (any dense layout works: the norms do not depend on the
    order and the update is element-wise). It runs once per tensor per step, so the common case
    (all contiguous) is checked first and cheaply.
    """
    if not (is_plain(param) and is_plain(grad) and (buf is None or is_plain(buf))):
        return False  # a tensor subclass (DTensor's data_ptr() is 0) is not memory the kernel can walk
    if master is not None or math_dtype is not None or not param.is_cpu or grad.is_sparse:
        return False
    dtype = param.dtype
    if dtype not in _DTYPE_CODES or (stochastic_rounding and dtype == torch.bfloat16) or grad.dtype != dtype:
        return False
    if param.is_contiguous() and grad.is_contiguous() and (buf is None or buf.is_contiguous()):
        return grad.shape == param.shape and (buf is None or (buf.dtype == dtype and buf.shape == param.shape
                                                              and buf.is_cpu))
    if not param.is_contiguous(memory_format=torch.channels_last):
        return False
    return _same_layout(param, grad) and (buf is None or _same_layout(param, buf))


def _scalar_pointer(value: Tensor | None) -> tuple[int, int]:
    """(pointer, kind) of a 0-d CPU float tensor for the kernel, ``(0, 0)`` for None."""
    if value is None:
        return 0, 0
    return value.data_ptr(), _SCALAR_KINDS[value.dtype]


def _readable_scalar(value: Tensor | float | None) -> bool:
    """Whether the kernel can read this lr/grad_scale/found_inf (a CPU float tensor, or not a tensor)."""
    return not isinstance(value, Tensor) or (
        value.device.type == "cpu" and value.dtype in _SCALAR_KINDS and value.numel() == 1)


def _call(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor | None,
          grad_scale: Tensor | None, found_inf: Tensor | None, hyper: list[float], flags: list[int]) -> None:
    """One kernel call over tensors of one dtype (``buffers`` empty without momentum)."""
    count = len(params)
    library = load()
    library.larsopt_lars_step(
        _DTYPE_CODES[params[0].dtype],
        count,
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in params]),
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in grads]),
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in buffers]) if buffers else None,
        (ctypes.c_int64 * count)(*[t.numel() for t in params]),
        (ctypes.c_double * len(hyper))(*hyper),
        (ctypes.c_int32 * len(flags))(*flags),
        *_scalar_pointer(lr),
        *_scalar_pointer(grad_scale),
        *_scalar_pointer(found_inf),
        torch.get_num_threads(),
    )


# Under a user's torch.compile the call is this custom op, which dynamo and inductor treat as one
# opaque in-place node (no graph break, nothing to compile); eagerly, ``_call`` is called directly,
# which skips the dispatcher's per-tensor work (it matters on thousands of small tensors).
@torch.library.custom_op("larsopt::lars_cpu_step", mutates_args=("params", "buffers"), device_types="cpu")
def _lars_cpu_step(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor | None,
                   grad_scale: Tensor | None, found_inf: Tensor | None, hyper: list[float], flags: list[int]) -> None:
    _call(params, grads, buffers, lr, grad_scale, found_inf, hyper, flags)


@_lars_cpu_step.register_fake
def _(params, grads, buffers, lr, grad_scale, found_inf, hyper, flags) -> None:
    return None


@torch.compiler.assume_constant_result
def _kernel_available() -> bool:
    """Whether the kernel is built and loaded here (a constant for dynamo: it builds at trace time)."""
    return load() is not None


class _Batch:
    """The tensors of one dtype for one kernel call."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.buffers: list[Tensor] = []


def step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    master_params: Sequence[Tensor | None],
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
    math_dtype: torch.dtype | None,
    stochastic_rounding: bool,
) -> list[int]:
    """Step every tensor the kernel covers (:func:`covers`), one kernel call per dtype, and return
    the indices of the others, untouched, for the caller to hand to another implementation. All
    are returned when the kernel is unavailable here or cannot read ``lr``/``grad_scale``/
    ``found_inf`` where they live (another device)."""
    if not (_kernel_available() and _readable_scalar(lr) and _readable_scalar(grad_scale)
            and _readable_scalar(found_inf)):
        return list(range(len(params)))

    batches: dict[torch.dtype, _Batch] = {}
    rest: list[int] = []
    use_momentum = momentum != 0
    for i, param in enumerate(params):
        grad = grads[i]
        buf = momentum_buffers[i] if use_momentum else None
        if not covers(param, grad, buf, master_params[i], math_dtype=math_dtype,
                      stochastic_rounding=stochastic_rounding):
            rest.append(i)
            continue
        dtype = param.dtype
        batch = batches.get(dtype)
        if batch is None:
            batch = batches[dtype] = _Batch()
        batch.params.append(param)
        batch.grads.append(grad)
        if use_momentum:
            batch.buffers.append(buf)

    hyper = [
        0.0 if isinstance(lr, Tensor) else float(lr),
        weight_decay, momentum, eta, epsilon, rescale_grad,
        math.inf if clip_gradient is None else clip_gradient,
    ]
    flags = [
        int(adapt), int(nesterov), int(trust_norm == "update"), int(trust_clip), int(maximize),
        _FORMS[momentum_form] if use_momentum else 0,
    ]
    lr_tensor = lr if isinstance(lr, Tensor) else None
    compiling = torch.compiler.is_compiling()
    for batch in batches.values():
        if compiling:
            _lars_cpu_step(batch.params, batch.grads, batch.buffers, lr_tensor, grad_scale, found_inf, hyper, flags)
            continue
        _call(batch.params, batch.grads, batch.buffers, lr_tensor, grad_scale, found_inf, hyper, flags)
        # The kernel wrote through raw pointers: bump the version counters as an in-place op
        # would, so autograd still detects a param saved for backward and changed by the step.
        torch.autograd.graph.increment_version(batch.params)
        if use_momentum:
            torch.autograd.graph.increment_version(batch.buffers)
    return rest
