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
converted to a Python number. Tensors autograd or a function transform has to see (any of them
requiring grad while grad mode is on, ``torch.vmap``/``torch.func`` wrappers) are handed on too,
so that every impl treats them like the reference does.

The library is cached on disk, each file beside a ``.sha256`` record (hash and size) written
after it: a file whose record is missing or does not match (an interrupted copy or restore of
the cache) is never loaded, but rebuilt. Without a home directory, or where the cache is not
writable, the library is built in a private folder under the temporary directory. When it cannot
be built at all, the first use warns once (``UserWarning``) with the reason.

A child made by ``fork()`` runs the kernel on one thread: the OpenMP runtime is torch's own
libgomp, whose workers (started by any parallel op of the parent, torch's or the kernel's) do not
exist in the child, and a parallel region there would wait for them forever (torch's own parallel
ops do, in such a child). The kernel opens no parallel region for a call under 2^18 elements, or
on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from larsopt._impl.norms import SUMS_DTYPE, compute_dtype
from larsopt._impl.reference import ratios_from_sums, stats_rows
from larsopt._impl.support import PLAIN_TYPES, is_plain, transform_active
from larsopt.options import ANY, LarsOptions

_SOURCE = Path(__file__).with_name("lars_cpu.cpp")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_NORM_DTYPE_CODES = {**_DTYPE_CODES, torch.float16: 3}
_SCALAR_KINDS = {torch.float32: 1, torch.float64: 2}
_FORMS = {"paper": 1, "torch": 2}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]

_library: ctypes.CDLL | None = None
_library_error: str | None = None
_lock = threading.Lock()
_forked = False  # in a forked child: the kernel runs on one thread
_carry_min_numel = 0  # tensors this large get their |w|^2 carried (the kernel's constant, read at load)


def _after_fork_in_child() -> None:
    # The parent's OpenMP pool is gone. It is torch's own libgomp (loaded first, the kernel links
    # to it too), so any parallel torch op of the parent may have started it, not only the kernel.
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads() -> int:
    return 1 if _forked else torch.get_num_threads()


def _compiler() -> list[str]:
    """The compiler command: ``$CXX`` split as a shell would (``CXX="ccache g++"``), else g++ or c++."""
    configured = os.environ.get("CXX", "").strip()
    if configured:
        try:
            command = shlex.split(configured)
        except ValueError as error:
            raise RuntimeError(f"CXX={configured!r} cannot be split into words as a shell would: {error}") from None
        if shutil.which(command[0]) is None:
            raise RuntimeError(f"CXX={configured!r}: {command[0]!r} is not an executable on PATH")
        return command
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    return [found]


def _home_cache() -> Path | None:
    """``$XDG_CACHE_HOME/larsopt``, else ``~/.cache/larsopt``; ``None`` without a home directory."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home == "~" or not os.path.isabs(home):  # no $HOME and no password entry
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "larsopt"


def _private_cache() -> Path:
    """A folder under the temporary directory that only this user can write (created if needed)."""
    directory = Path(tempfile.gettempdir()) / f"larsopt-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    directory.mkdir(mode=0o700, exist_ok=True)
    status = directory.stat()
    if hasattr(os, "getuid") and (status.st_uid != os.getuid() or status.st_mode & 0o022):
        # another user's folder (or one others can write): never load a library from there
        directory = Path(tempfile.mkdtemp(prefix="larsopt-"))
    return directory


def _record(library: Path) -> Path:
    """The file beside ``library`` that certifies it: its SHA-256 and size, written after it."""
    return library.with_name(library.name + ".sha256")


def _digest(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}"


def _verified(library: Path) -> bool:
    """Whether ``library`` is a whole file this module wrote: its record exists and matches it."""
    try:
        return _record(library).read_text().strip() == _digest(library.read_bytes())
    except OSError:
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` under a temporary name and rename it: readers see the old file or the whole new one."""
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _build_into(directory: Path, name: str, compiler: list[str]) -> Path:
    """Compile the kernel into ``directory``: library first, then its record."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / name
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / name
        subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], check=True, capture_output=True,
                       text=True)
        data = built.read_bytes()
        os.replace(built, library)
    _write_atomically(_record(library), _digest(data).encode())
    return library


def _build(compiler: list[str], source: bytes) -> Path:
    """The path of a verified kernel library, built if no cache holds one (once per source,
    compiler, flags and CPU).

    The name hashes everything the binary depends on, because ``-march=native`` makes it specific
    to this CPU. The home cache is tried first; the private temporary one when there is no home
    or the home cache cannot be written. A library without a matching record is rebuilt, never
    loaded (loading a truncated one kills the process with SIGBUS)."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    key = hashlib.sha256(b"\0".join([source, shlex.join(compiler).encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), cpu.encode()])).hexdigest()[:20]
    name = f"lars_cpu_{key}.so"
    home = _home_cache()
    if home is not None and _verified(home / name):
        return home / name
    if home is not None:
        try:
            return _build_into(home, name, compiler)
        except OSError:
            pass  # not writable (or full): build where this user can write
    private = _private_cache()
    if _verified(private / name):
        return private / name
    return _build_into(private, name, compiler)


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use; ``None`` when it cannot be built here (no compiler,
    not an x86/ARM Linux/macOS toolchain, source missing), after one ``UserWarning`` giving the
    reason (also :func:`unavailable_reason`)."""
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    with _lock:
        if _library is not None or _library_error is not None:
            return _library
        try:
            if sys.platform == "win32":
                raise RuntimeError("the fused CPU kernel is built with gcc/clang flags; Windows is not supported")
            library = ctypes.CDLL(str(_build(_compiler(), _SOURCE.read_bytes())))
            library.larsopt_kernel_args_size.restype = ctypes.c_int64
            size = library.larsopt_kernel_args_size()
            if size != ctypes.sizeof(_KernelArgs):
                raise RuntimeError(f"the kernel's argument struct has {size} bytes and _KernelArgs "
                                   f"{ctypes.sizeof(_KernelArgs)}: lars_cpu.cpp and fused_cpu.py disagree")
            function = library.larsopt_lars_step
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.POINTER(_KernelArgs)]
            library.larsopt_carry_min_numel.restype = ctypes.c_int64
            library.larsopt_shared_min_numel.restype = ctypes.c_int64
            global _carry_min_numel
            _carry_min_numel = library.larsopt_carry_min_numel()
            norms = library.larsopt_sums_of_squares
            norms.restype = ctypes.c_int
            norms.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                              ctypes.c_void_p]
            _library = library
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            _library_error = f"{type(error).__name__}: {detail}".strip()
            warnings.warn(f"larsopt's fused CPU kernel is unavailable, so CPU steps run without it (impl='fused' "
                          f"takes the foreach path, 12-20x slower): {_library_error}", UserWarning, stacklevel=2)
    return _library


def unavailable_reason() -> str | None:
    """Why the kernel could not be built (``None`` if it was, or was not tried yet)."""
    return _library_error


def _same_layout(param: Tensor, other: Tensor) -> bool:
    return other.dtype == param.dtype and other.shape == param.shape and other.stride() == param.stride() \
        and other.is_cpu and not other.is_sparse


#: What the kernel computes exactly like the reference (other values go to the next path).
#: norm_source and lazy_update only matter for tensors it does not cover (masters, sparse grads).
SUPPORTED = {
    **{name: ANY for name in ("lr", "momentum", "eta", "epsilon", "weight_decay", "adapt", "nesterov", "trust_clip",
                              "rescale_grad", "clip_gradient", "maximize", "norm_source", "lazy_update",
                              "stochastic_rounding")},
    "momentum_form": tuple(_FORMS),  # the kernel's switch values
    "trust_norm": ("sum", "update"),
    "math_dtype": (None,),
}


def covers(param: Tensor, grad: Tensor, buf: Tensor | None, master: Tensor | None,
           options: LarsOptions) -> torch.dtype | None:
    """The dtype in which the kernel steps this tensor exactly like the reference (given
    :data:`SUPPORTED`), or ``None`` where it does not.

    The kernel walks the storage of param, grad and buffer as flat arrays in the same order, so
    they must be plain dense CPU tensors laid out alike (any dense layout works: the norms do not
    depend on the order and the update is element-wise). It runs once per tensor per step, so the
    common case (all contiguous) is checked first, reading each attribute it needs once.
    """
    # (the type tests inline, and dtypes compared by identity: this runs for every tensor of every
    # step, and on many tensors each attribute read is a cache miss on the tensor's metadata)
    if type(param) not in PLAIN_TYPES or type(grad) not in PLAIN_TYPES or (
            buf is not None and type(buf) not in PLAIN_TYPES):
        return None  # a tensor subclass (DTensor's data_ptr() is 0) is not memory the kernel can walk
    # (step() has handed on every tensor of a call made under a torch.func transform)
    dtype = param.dtype
    if master is not None or grad.dtype is not dtype or dtype not in _DTYPE_CODES or not param.is_cpu \
            or grad.is_sparse or (dtype is torch.bfloat16 and options.stochastic_rounding):
        return None
    if param.is_contiguous() and grad.is_contiguous() and (buf is None or buf.is_contiguous()):
        shape = param.shape
        if grad.shape == shape and (buf is None or (buf.dtype is dtype and buf.shape == shape and buf.is_cpu)):
            return dtype
        return None
    if not param.is_contiguous(memory_format=torch.channels_last):
        return None
    return dtype if _same_layout(param, grad) and (buf is None or _same_layout(param, buf)) else None


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
        ("weight_sums_in", ctypes.c_void_p),
        ("weight_sums_out", ctypes.c_void_p),
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


_data_ptr, _numel = Tensor.data_ptr, Tensor.numel


def _call(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor | None,
          grad_scale: Tensor | None, found_inf: Tensor | None, sums_out: Tensor | None, trust_in: Tensor | None,
          stats_out: Tensor | None, reals: list[float], switches: list[int], weight_sums_in: ctypes.Array | None = None,
          weight_sums_out: ctypes.Array | None = None) -> int:
    """One kernel call over tensors of one dtype (``buffers`` empty without momentum); 1 when
    ``found_inf`` skipped it (nothing written), else 0."""
    # (array.array fills from a C-level map: several times faster than ctypes arrays from lists
    # on thousands of tensors; the arrays live until the call returns)
    param_pointers, grad_pointers = array("Q", map(_data_ptr, params)), array("Q", map(_data_ptr, grads))
    buffer_pointers, numels = array("Q", map(_data_ptr, buffers)), array("q", map(_numel, params))
    args = _KernelArgs(
        count=len(params),
        params=param_pointers.buffer_info()[0],
        grads=grad_pointers.buffer_info()[0],
        buffers=buffer_pointers.buffer_info()[0] if buffers else None,
        numels=numels.buffer_info()[0],
        lr_tensor=_pointer(lr),
        grad_scale_tensor=_pointer(grad_scale),
        found_inf_tensor=_pointer(found_inf),
        sums_out=_pointer(sums_out),
        trust_in=_pointer(trust_in),
        stats_out=_pointer(stats_out),
        weight_sums_in=None if weight_sums_in is None else ctypes.addressof(weight_sums_in),
        weight_sums_out=None if weight_sums_out is None else ctypes.addressof(weight_sums_out),
        lr_kind=_scalar_kind(lr),
        grad_scale_kind=_scalar_kind(grad_scale),
        found_inf_kind=_scalar_kind(found_inf),
        threads=_threads(),
        **dict(zip(_REAL_FIELDS, reals)),
        **dict(zip(_SWITCH_FIELDS, switches)),
    )
    return load().larsopt_lars_step(ctypes.byref(args))


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


def _native_sums(tensors: list[Tensor], out: Tensor) -> None:
    """The kernel's sums of squares of ``tensors`` (dense CPU tensors of one dtype) into ``out``."""
    count = len(tensors)
    pointers = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    numels = (ctypes.c_int64 * count)(*[t.numel() for t in tensors])
    load().larsopt_sums_of_squares(count, pointers, numels, _NORM_DTYPE_CODES[tensors[0].dtype], _threads(),
                                   out.data_ptr())


@torch.library.custom_op("larsopt::sums_of_squares", mutates_args=(), device_types="cpu")
def _sums_of_squares_op(tensors: list[Tensor]) -> Tensor:
    out = torch.empty(len(tensors), dtype=SUMS_DTYPE)
    _native_sums(tensors, out)
    return out


@_sums_of_squares_op.register_fake
def _(tensors):
    return torch.empty(len(tensors), dtype=SUMS_DTYPE)


def sums_of_squares(tensors: Sequence[Tensor]) -> Tensor | None:
    """The sums of squares of ``tensors`` (one dtype and device) as a float64 vector, summed by the
    kernel (float blocks added in double, widened where a block overflows or underflows: accurate
    at any size, finite for every finite tensor, read in one pass); ``None`` where the kernel
    cannot take them (not plain float CPU tensors, autograd has to see them, or no kernel)."""
    first = tensors[0]
    if first.dtype not in _NORM_DTYPE_CODES or not first.is_cpu:
        return None
    if torch.compiler.is_compiling():
        return _sums_of_squares_op([t if t.is_contiguous() else t.contiguous() for t in tensors]) \
            if _kernel_available() else None
    if transform_active() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    if not all(is_plain(t) and not t.is_sparse for t in tensors) or load() is None:
        return None
    out = torch.empty(len(tensors), dtype=SUMS_DTYPE)
    # (the sum does not depend on the order of the elements, but the kernel walks numel() of them)
    _native_sums([t if t.is_contiguous() else t.contiguous() for t in tensors], out)
    return out


class _Batch:
    """The tensors of one dtype for one kernel call, and their positions in the caller's lists."""

    def __init__(self, indices: list[int], params: list[Tensor], grads: list[Tensor], buffers: list[Tensor]) -> None:
        self.indices, self.params, self.grads = indices, params, grads
        self.buffers = buffers  # (empty without momentum)

    def run(self, options: LarsOptions, phase: int, grad_scale: Tensor | None, found_inf: Tensor | None,
            sums_out: Tensor | None = None, trust_in: Tensor | None = None, stats_out: Tensor | None = None,
            carry: CarriedWeightNorms | None = None) -> None:
        reals, switches = _kernel_fields(options, self.params[0].dtype, phase)
        lr = options.lr if isinstance(options.lr, Tensor) else None
        if torch.compiler.is_compiling():
            _lars_cpu_step(self.params, self.grads, self.buffers, lr, grad_scale, found_inf, sums_out, trust_in,
                           stats_out, reals, switches)
            return
        carried = carry.before(self.params) if carry is not None else None
        written = None if carried is None else (ctypes.c_double * len(self.params))()
        skipped = _call(self.params, self.grads, self.buffers, lr, grad_scale, found_inf, sums_out, trust_in,
                        stats_out, reals, switches, carried, written)
        if phase != _NORMS:
            # The kernel wrote through raw pointers: bump the version counters as an in-place op
            # would, so autograd still detects a param saved for backward and changed by the step.
            torch.autograd.graph.increment_version(self.params)
            if self.buffers:
                torch.autograd.graph.increment_version(self.buffers)
        if carried is not None:
            carry.after(self.params, carried, written, skipped == 1)


class CarriedWeightNorms:
    """Each large param's |w|^2 as the fused CPU kernel's update wrote it, for the next step's
    norms (``carry_weight_norms``): that step then reads only the gradient for them, 16 bytes per
    param read instead of 20, and gets the same bits (the kernel sums the squares of the weights it
    writes exactly as its norm pass would sum them).

    An entry is used only while the param's version counter, data pointer, size and storage are
    those recorded right after the kernel wrote it: any in-place op on the param or a view of it
    (``copy_`` under ``no_grad``, ``nn.Module.load_state_dict``, ``nn.init``, ``p.detach().mul_()``,
    another impl's step) bumps the counter, and ``p.data = other`` changes the storage or the size.
    Writes through another tensor that shares the param's memory but has a version counter of its
    own are not seen, and the next step then uses the old |w| (one step's trust ratio; the step
    after it is right again): in-place ops on ``p.data`` (``p.data.clamp_()``, ``p.data.copy_()``)
    or on a tensor ``p.data`` was set to (``vector_to_parameters``' flat vector), tensors aliasing it
    through ``set_``, ``untyped_storage()`` writes, ``torch.distributed`` collectives into the
    param's memory (``dist.broadcast(p)``), and writes from outside torch (``p.numpy()``, DLPack,
    ctypes, another process through shared memory). Only tensors of at least
    ``larsopt_carry_min_numel()`` elements are carried (smaller ones stay in cache between the
    kernel's two passes: nothing to gain)."""

    def __init__(self) -> None:
        # param -> (|w|^2, version, data pointer, numel, storage): torch keeps one Python object per
        # live storage, so a weak reference to it tells a new storage apart even at the same
        # address; numel catches `p.data = p.data[:k]` (same storage, pointer and version).
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def clear(self) -> None:
        self._entries.clear()

    def before(self, params: list[Tensor]) -> ctypes.Array:
        """The kernel's ``weight_sums_in`` for ``params``: each one's carried |w|^2, -1 where none is valid."""
        carried = (ctypes.c_double * len(params))(*itertools.repeat(-1.0, len(params)))
        entries, minimum = self._entries, _carry_min_numel
        for i, param in enumerate(params):
            numel = param.numel()
            if numel >= minimum:
                entry = entries.get(param)
                if entry is not None and entry[1] == param._version and entry[2] == param.data_ptr() \
                        and entry[3] == numel and entry[4]() is param.untyped_storage():
                    carried[i] = entry[0]
        return carried

    def after(self, params: list[Tensor], carried: ctypes.Array, written: ctypes.Array, skipped: bool) -> None:
        """Keep what the kernel wrote (called after the version counters were bumped); a step that
        found_inf skipped left the weights as they were, so their valid entries stay valid. (An
        entry not renewed here has a stale version: it is never used again.)"""
        sums = carried if skipped else written
        entries = self._entries
        for i, param in enumerate(params):
            value = sums[i]
            if not value < 0:  # (-1: none; a NaN |w|^2 is carried as it is)
                entries[param] = (value, param._version, param.data_ptr(), param.numel(),
                                  weakref.ref(param.untyped_storage()))


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
    carry: CarriedWeightNorms | None = None,
) -> list[int]:
    """Step every tensor the kernel covers (:func:`covers`), one kernel call per dtype, and return
    the indices of the others, untouched, for the caller to hand to another path. All are returned
    when the kernel is unavailable here or cannot read ``lr``/``grad_scale``/``found_inf`` where
    they live (another device). The arguments are those of :func:`larsopt._impl.reference.lars_step`.

    Without ``reduce_sums`` each tensor's norms and update run back to back in one call (the update
    reads from cache); with it, one call per dtype takes the sums, ``reduce_sums`` combines them,
    and a second call updates with the trust ratios taken from the result. ``carry`` (one-call
    steps only) reuses and keeps each large tensor's |w|^2 (:class:`CarriedWeightNorms`)."""
    if not (_readable_scalar(options.lr) and _readable_scalar(grad_scale) and _readable_scalar(found_inf)):
        return list(range(len(params)))
    compiling = torch.compiler.is_compiling()
    if not compiling and transform_active():
        return list(range(len(params)))  # vmap/grad wrappers: the kernel would write past the transform
    # In grad mode, tensors that require grad go where autograd sees the in-place update (or
    # refuses it, for a leaf), as with the other impls. LARS.step runs under no_grad.
    autograd_sees = not compiling and torch.is_grad_enabled()

    use_momentum = options.momentum != 0
    buffers = momentum_buffers if use_momentum else itertools.repeat(None, len(params))
    dtypes = list(map(covers, params, grads, buffers, master_params, itertools.repeat(options, len(params))))
    batches: dict[torch.dtype, _Batch] = {}
    rest: list[int] = []
    if not autograd_sees and dtypes and dtypes[0] is not None and dtypes.count(dtypes[0]) == len(dtypes):
        # the common case: one kernel call over all of them, no per-tensor grouping
        batches[dtypes[0]] = _Batch(list(range(len(params))), list(params), list(grads),
                                    list(momentum_buffers) if use_momentum else [])
    else:
        for i, dtype in enumerate(dtypes):
            param, grad = params[i], grads[i]
            buf = momentum_buffers[i] if use_momentum else None
            if dtype is None or autograd_sees and (
                    param.requires_grad or grad.requires_grad or (buf is not None and buf.requires_grad)):
                rest.append(i)
                continue
            batch = batches.get(dtype)
            if batch is None:
                batch = batches[dtype] = _Batch([], [], [], [])
            batch.indices.append(i)
            batch.params.append(param)
            batch.grads.append(grad)
            if use_momentum:
                batch.buffers.append(buf)
    if batches and not _kernel_available():
        return list(range(len(params)))

    if reduce_sums is None or not options.adapt:
        # (|w|^2 matters only to a step that takes norms; a compiled step has no carry)
        if not options.adapt or compiling:
            carry = None
        for batch in batches.values():
            # (nan rows where the kernel writes none: a step AMP skips)
            rows = None if stats is None else torch.full((len(batch.params), 3), math.nan, dtype=torch.float32)
            batch.run(options, _WHOLE, grad_scale, found_inf, stats_out=rows, carry=carry)
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
