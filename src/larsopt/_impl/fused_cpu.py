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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from larsopt._impl.norms import SUMS_DTYPE, compute_dtype
from larsopt._impl.reference import ratios_from_sums, stats_rows
from larsopt._impl.support import is_plain
from larsopt.options import ANY, LarsOptions

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
            library.larsopt_kernel_args_size.restype = ctypes.c_int64
            size = library.larsopt_kernel_args_size()
            if size != ctypes.sizeof(_KernelArgs):
                raise RuntimeError(f"the kernel's argument struct has {size} bytes and _KernelArgs "
                                   f"{ctypes.sizeof(_KernelArgs)}: lars_cpu.cpp and fused_cpu.py disagree")
            function = library.larsopt_lars_step
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.POINTER(_KernelArgs)]
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


#: What the kernel computes exactly like the reference (other values go to the next path).
#: norm_source and lazy_update only matter for tensors it does not cover (masters, sparse grads).
SUPPORTED = {name: ANY for name in (
    "lr", "momentum", "eta", "epsilon", "weight_decay", "adapt", "nesterov", "momentum_form", "trust_norm", "trust_clip",
    "rescale_grad", "clip_gradient", "maximize", "norm_source", "lazy_update", "stochastic_rounding",
)} | {"math_dtype": (None,)}


def covers(param: Tensor, grad: Tensor, buf: Tensor | None, master: Tensor | None, options: LarsOptions) -> bool:
    """Whether the kernel computes this tensor's step exactly like the reference (given :data:`SUPPORTED`).

    The kernel walks the storage of param, grad and buffer as flat arrays in the same order, so
    they must be plain dense CPU tensors laid out alike (any dense layout works: the norms do not
    depend on the order and the update is element-wise). It runs once per tensor per step, so the
    common case (all contiguous) is checked first and cheaply.
    """
    if not (is_plain(param) and is_plain(grad) and (buf is None or is_plain(buf))):
        return False  # a tensor subclass (DTensor's data_ptr() is 0) is not memory the kernel can walk
    dtype = param.dtype
    if master is not None or not param.is_cpu or grad.is_sparse or dtype not in _DTYPE_CODES \
            or grad.dtype != dtype or (options.stochastic_rounding and dtype == torch.bfloat16):
        return False
    if param.is_contiguous() and grad.is_contiguous() and (buf is None or buf.is_contiguous()):
        return grad.shape == param.shape and (buf is None or (buf.dtype == dtype and buf.shape == param.shape
                                                              and buf.is_cpu))
    if not param.is_contiguous(memory_format=torch.channels_last):
        return False
    return _same_layout(param, grad) and (buf is None or _same_layout(param, buf))


class _KernelArgs(ctypes.Structure):
    """``LarsKernelArgs`` of ``lars_cpu.cpp``, field for field (its size is checked at load)."""

    _fields_ = [
        ("count", ctypes.c_int64),
        ("params", ctypes.c_void_p),
        ("grads", ctypes.c_void_p),
        ("buffers", ctypes.c_void_p),
        ("numels", ctypes.c_void_p),
        ("lr_tensor", ctypes.c_void_p),
        ("grad_scale_tensor", ctypes.c_void_p),
        ("found_inf_tensor", ctypes.c_void_p),
        ("sums_out", ctypes.c_void_p),
        ("trust_in", ctypes.c_void_p),
        ("stats_out", ctypes.c_void_p),
        ("lr", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("eta", ctypes.c_double),
        ("epsilon", ctypes.c_double),
        ("rescale_grad", ctypes.c_double),
        ("clip_gradient", ctypes.c_double),
        ("dtype", ctypes.c_int32),
        ("lr_kind", ctypes.c_int32),
        ("grad_scale_kind", ctypes.c_int32),
        ("found_inf_kind", ctypes.c_int32),
        ("phase", ctypes.c_int32),
        ("adapt", ctypes.c_int32),
        ("nesterov", ctypes.c_int32),
        ("trust_update", ctypes.c_int32),
        ("trust_clip", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("momentum_form", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


#: The kernel's number fields that come from the options (the custom op passes them as two lists,
#: in this order, and the call rebuilds the struct by name).
_REAL_FIELDS = ("lr", "weight_decay", "momentum", "eta", "epsilon", "rescale_grad", "clip_gradient")
_SWITCH_FIELDS = ("dtype", "phase", "adapt", "nesterov", "trust_update", "trust_clip", "maximize", "momentum_form")
_WHOLE, _NORMS, _UPDATE = 0, 1, 2


def _kernel_fields(options: LarsOptions, dtype: torch.dtype, phase: int) -> tuple[list[float], list[int]]:
    """The values of :data:`_REAL_FIELDS` and :data:`_SWITCH_FIELDS` for a call."""
    lr = options.lr
    reals = dict(
        lr=0.0 if isinstance(lr, Tensor) else float(lr),
        weight_decay=float(options.weight_decay),
        momentum=float(options.momentum),
        eta=float(options.eta),
        epsilon=float(options.epsilon),
        rescale_grad=float(options.rescale_grad),
        clip_gradient=math.inf if options.clip_gradient is None else float(options.clip_gradient),
    )
    switches = dict(
        dtype=_DTYPE_CODES[dtype],
        phase=phase,
        adapt=int(options.adapt),
        nesterov=int(options.nesterov),
        trust_update=int(options.trust_norm == "update"),
        trust_clip=int(options.trust_clip),
        maximize=int(options.maximize),
        momentum_form=_FORMS[options.momentum_form] if options.momentum != 0 else 0,
    )
    return [reals[name] for name in _REAL_FIELDS], [switches[name] for name in _SWITCH_FIELDS]


def _pointer(value: Tensor | None) -> int:
    return 0 if value is None else value.data_ptr()


def _scalar_kind(value: Tensor | None) -> int:
    """The kernel's code for a 0-d CPU float tensor it reads at call time (0: absent)."""
    return 0 if value is None else _SCALAR_KINDS[value.dtype]


def _readable_scalar(value: Tensor | float | None) -> bool:
    """Whether the kernel can read this lr/grad_scale/found_inf (a CPU float tensor, or not a tensor)."""
    return not isinstance(value, Tensor) or (
        value.device.type == "cpu" and value.dtype in _SCALAR_KINDS and value.numel() == 1)


def _call(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor | None,
          grad_scale: Tensor | None, found_inf: Tensor | None, sums_out: Tensor | None, trust_in: Tensor | None,
          stats_out: Tensor | None, reals: list[float], switches: list[int]) -> None:
    """One kernel call over tensors of one dtype (``buffers`` empty without momentum)."""
    count = len(params)
    args = _KernelArgs(
        count=count,
        params=ctypes.cast((ctypes.c_void_p * count)(*[t.data_ptr() for t in params]), ctypes.c_void_p),
        grads=ctypes.cast((ctypes.c_void_p * count)(*[t.data_ptr() for t in grads]), ctypes.c_void_p),
        buffers=ctypes.cast((ctypes.c_void_p * count)(*[t.data_ptr() for t in buffers]), ctypes.c_void_p)
        if buffers else None,
        numels=ctypes.cast((ctypes.c_int64 * count)(*[t.numel() for t in params]), ctypes.c_void_p),
        lr_tensor=_pointer(lr),
        grad_scale_tensor=_pointer(grad_scale),
        found_inf_tensor=_pointer(found_inf),
        sums_out=_pointer(sums_out),
        trust_in=_pointer(trust_in),
        stats_out=_pointer(stats_out),
        lr_kind=_scalar_kind(lr),
        grad_scale_kind=_scalar_kind(grad_scale),
        found_inf_kind=_scalar_kind(found_inf),
        threads=torch.get_num_threads(),
        **dict(zip(_REAL_FIELDS, reals)),
        **dict(zip(_SWITCH_FIELDS, switches)),
    )
    load().larsopt_lars_step(ctypes.byref(args))


# Under a user's torch.compile the call is this custom op, which dynamo and inductor treat as one
# opaque in-place node (no graph break, nothing to compile); eagerly, ``_call`` is called directly,
# which skips the dispatcher's per-tensor work (it matters on thousands of small tensors).
@torch.library.custom_op("larsopt::lars_cpu_step", mutates_args=("params", "buffers", "sums_out", "stats_out"),
                         device_types="cpu")
def _lars_cpu_step(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor | None,
                   grad_scale: Tensor | None, found_inf: Tensor | None, sums_out: Tensor | None,
                   trust_in: Tensor | None, stats_out: Tensor | None, reals: list[float], switches: list[int]) -> None:
    _call(params, grads, buffers, lr, grad_scale, found_inf, sums_out, trust_in, stats_out, reals, switches)


@_lars_cpu_step.register_fake
def _(params, grads, buffers, lr, grad_scale, found_inf, sums_out, trust_in, stats_out, reals, switches) -> None:
    return None


@torch.compiler.assume_constant_result
def _kernel_available() -> bool:
    """Whether the kernel is built and loaded here (a constant for dynamo: it builds at trace time)."""
    return load() is not None


class _Batch:
    """The tensors of one dtype for one kernel call, and their positions in the caller's lists."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.buffers: list[Tensor] = []

    def run(self, options: LarsOptions, phase: int, grad_scale: Tensor | None, found_inf: Tensor | None,
            sums_out: Tensor | None = None, trust_in: Tensor | None = None, stats_out: Tensor | None = None) -> None:
        reals, switches = _kernel_fields(options, self.params[0].dtype, phase)
        lr = options.lr if isinstance(options.lr, Tensor) else None
        if torch.compiler.is_compiling():
            _lars_cpu_step(self.params, self.grads, self.buffers, lr, grad_scale, found_inf, sums_out, trust_in,
                           stats_out, reals, switches)
            return
        _call(self.params, self.grads, self.buffers, lr, grad_scale, found_inf, sums_out, trust_in, stats_out, reals,
              switches)
        if phase != _NORMS:
            # The kernel wrote through raw pointers: bump the version counters as an in-place op
            # would, so autograd still detects a param saved for backward and changed by the step.
            torch.autograd.graph.increment_version(self.params)
            if self.buffers:
                torch.autograd.graph.increment_version(self.buffers)


def step(
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
    """Step every tensor the kernel covers (:func:`covers`), one kernel call per dtype, and return
    the indices of the others, untouched, for the caller to hand to another path. All are returned
    when the kernel is unavailable here or cannot read ``lr``/``grad_scale``/``found_inf`` where
    they live (another device). The arguments are those of :func:`larsopt._impl.reference.lars_step`.

    Without ``reduce_sums`` each tensor's norms and update run back to back in one call (the update
    reads from cache); with it, one call per dtype takes the sums, ``reduce_sums`` combines them,
    and a second call updates with the trust ratios taken from the result."""
    if not (_kernel_available() and _readable_scalar(options.lr) and _readable_scalar(grad_scale)
            and _readable_scalar(found_inf)):
        return list(range(len(params)))

    batches: dict[torch.dtype, _Batch] = {}
    rest: list[int] = []
    use_momentum = options.momentum != 0
    for i, param in enumerate(params):
        grad = grads[i]
        buf = momentum_buffers[i] if use_momentum else None
        if not covers(param, grad, buf, master_params[i], options):
            rest.append(i)
            continue
        batch = batches.get(param.dtype)
        if batch is None:
            batch = batches[param.dtype] = _Batch()
        batch.indices.append(i)
        batch.params.append(param)
        batch.grads.append(grad)
        if use_momentum:
            batch.buffers.append(buf)

    if reduce_sums is None or not options.adapt:
        for batch in batches.values():
            # (nan rows where the kernel writes none: a step AMP skips)
            rows = None if stats is None else torch.full((len(batch.params), 3), math.nan, dtype=torch.float32)
            batch.run(options, _WHOLE, grad_scale, found_inf, stats_out=rows)
            if stats is not None:
                stats[batch.indices] = rows.to(stats.device)
        return rest

    ordered = list(batches.values())
    sums = [torch.zeros(len(batch.params), 3, dtype=SUMS_DTYPE) for batch in ordered]
    for batch, batch_sums in zip(ordered, sums):
        batch.run(options, _NORMS, grad_scale, found_inf, sums_out=batch_sums)
    reduced = reduce_sums(torch.cat(sums)) if ordered else None
    for batch, batch_sums in zip(ordered, reduced.split([len(batch.params) for batch in ordered]) if ordered else ()):
        lam = ratios_from_sums(batch_sums, options, compute_dtype(batch.params[0].dtype))
        batch.run(options, _UPDATE, grad_scale, found_inf, trust_in=lam.to(SUMS_DTYPE).contiguous())
        if stats is not None:
            stats[batch.indices] = stats_rows(batch_sums, lam).to(stats.device)
    return rest
