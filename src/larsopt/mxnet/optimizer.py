"""MXNet 2.0's ``Optimizer`` base class and registry (``mxnet.optimizer.optimizer``), on torch tensors.

What the base class resolves for every optimizer:

* ``num_update``: per-device, per-index counters starting at ``begin_num_update``;
  ``num_update`` is the largest count seen (shared across devices).
* The learning rate: ``lr_scheduler(num_update)`` if a scheduler is set, else ``lr``.
* Per-index multipliers, first match wins: ``param_dict[index].lr_mult`` / ``.wd_mult``, then the
  index in ``lr_mult`` / ``wd_mult``, then the index's name (``idx2name``) in those tables, else 1.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from larsopt.mxnet import _arrays, _checks
from larsopt.mxnet.errors import MXNetAssertionError

Index = Any  # MXNet indices are ints, or names (str) when a kvstore passes them.

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

SCHEDULER_OVERWRITE_MESSAGE = "learning rate from ``lr_scheduler`` has been overwritten by ``learning_rate`` in optimizer."
FLOAT16_WITHOUT_MASTER_MESSAGE = (
    "Accumulating with float16 in optimizer can lead to poor accuracy or slow convergence. "
    "Consider using multi_precision=True option of the optimizer"
)


def as_index(index: Any) -> int | str:
    """The key of a weight: an int (from a Python or NumPy integer, or a 0-d integer tensor or
    array, by value) or a str name (bytes from a kvstore are decoded).

    A tensor is hashed by identity, so without this a new ``torch.tensor(0)`` would be a new
    index (a new state and counter) at every call.
    """
    if isinstance(index, str):
        return index
    if isinstance(index, bytes):
        return index.decode()
    if isinstance(index, torch.Tensor) and index.ndim == 0 and index.dtype in _INTEGER_DTYPES:
        return int(index.item())
    if isinstance(index, np.ndarray) and index.ndim == 0 and np.issubdtype(index.dtype, np.integer):
        return int(index.item())
    if isinstance(index, numbers.Integral) and not isinstance(index, (bool, np.bool_)):
        return int(index)
    if isinstance(index, (torch.Tensor, np.ndarray)):
        described = f"a {type(index).__name__} of shape {tuple(index.shape)} and dtype {index.dtype}"
    else:
        described = f"{index!r} of type {type(index).__name__}"
    raise TypeError(f"an index must be an int (Python or NumPy, or a 0-d integer tensor) or a str name, got "
                    f"{described}; pass several indices as a list")


class Optimizer:
    """Base class of the MXNet-style optimizers (MXNet 2.0's ``mxnet.optimizer.Optimizer``).

    Args:
        rescale_grad: gradient multiplier (often ``1 / batch_size``).
        param_idx2name: dict ``{index: name}``, used for name-keyed multipliers (and by LARS for
            its exclusion by name).
        wd: weight decay, scaled per index by its wd multiplier.
        clip_gradient: clip the rescaled gradient to ``[-clip_gradient, clip_gradient]``
            (``None``: off).
        learning_rate: the global lr. ``None`` keeps a scheduler's ``base_lr`` (or means 0.01
            without a scheduler); a value different from a scheduler's ``base_lr`` overwrites it,
            with a ``UserWarning``.
        lr_scheduler: any callable ``num_update -> lr`` (see :mod:`larsopt.mxnet.lr_scheduler`).
        sym: optional object with ``attr_dict()`` and ``list_arguments()`` (an MXNet Symbol),
            whose ``__lr_mult__`` / ``__wd_mult__`` attributes seed the multipliers by name.
        begin_num_update: initial value of the update counters.
        multi_precision: keep a float32 master copy of float16 weights in the state.
        param_dict: ``{index: param}``; any object with ``lr_mult`` and ``wd_mult`` attributes
            (a Gluon Parameter). Takes priority over every other multiplier. Not pickled.
        aggregate_num: how many weights an :class:`~larsopt.mxnet.Updater` passes per call
            (``None``: 1; ``numpy.inf``: all in one call).
        use_fused_step: ``update`` calls ``fused_step`` if True, else ``step`` (``None``: False).

    Any other keyword raises ``TypeError`` naming it. Numbers may be NumPy scalars; a wrong type
    raises ``TypeError`` and a NaN or infinite number ``ValueError``, both naming the argument.
    """

    opt_registry: ClassVar[dict[str, type[Optimizer]]] = {}
    #: Keywords of other MXNet versions, with what to use instead (for the ``TypeError``).
    legacy_kwarg_hints: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        rescale_grad: float = 1.0,
        param_idx2name: dict[Index, str] | None = None,
        wd: float = 0.0,
        clip_gradient: float | None = None,
        learning_rate: float | None = None,
        lr_scheduler: Callable[[int], float] | None = None,
        sym: Any = None,
        begin_num_update: int = 0,
        multi_precision: bool = False,
        param_dict: dict[Index, Any] | None = None,
        aggregate_num: int | float | None = None,
        use_fused_step: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            self._reject_kwargs(kwargs)
        for name, value in (("rescale_grad", rescale_grad), ("wd", wd)):
            _checks.real(name, value)
        _checks.real("clip_gradient", clip_gradient, none_ok=True)
        _checks.real("learning_rate", learning_rate, none_ok=True)
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"lr_scheduler must be None or a callable num_update -> lr, got {lr_scheduler!r}")
        _checks.integer("begin_num_update", begin_num_update, minimum=0)
        _checks.boolean("multi_precision", multi_precision)
        _checks.boolean("use_fused_step", use_fused_step, none_ok=True)
        if aggregate_num is not None and not aggregates_everything(aggregate_num):
            _checks.integer("aggregate_num", aggregate_num, minimum=0, alternative="numpy.inf (everything)")
        self.rescale_grad = rescale_grad
        self.lr_scheduler = lr_scheduler
        if lr_scheduler is None and learning_rate is None:
            learning_rate = 0.01
        self.lr = learning_rate
        if lr_scheduler is not None and learning_rate is not None and lr_scheduler.base_lr != learning_rate:
            warnings.warn(SCHEDULER_OVERWRITE_MESSAGE, UserWarning, stacklevel=3)
            lr_scheduler.base_lr = learning_rate

        self.wd = wd
        self.lr_mult: dict[Index, float] = {}
        self.wd_mult: dict[Index, float] = {}
        self.begin_num_update = begin_num_update
        self.num_update = begin_num_update
        self._all_index_update_counts: dict[int, dict[Index, int]] = {0: {}}
        self._index_update_count = self._all_index_update_counts[0]
        self.clip_gradient = clip_gradient
        self.multi_precision = multi_precision
        self.aggregate_num = 1 if aggregate_num is None else aggregate_num

        if param_idx2name is None:
            param_idx2name = {}
        if not isinstance(param_idx2name, dict):
            raise MXNetAssertionError("param_idx2name should be a dict of param indexes to names.")
        self.idx2name = param_idx2name.copy()
        self.sym_info = (sym.attr_dict(), sym.list_arguments()) if sym is not None else ()
        self.param_dict = param_dict if param_dict else {}
        self.use_fused_step = use_fused_step if use_fused_step is not None else False

        self.set_lr_mult({})
        self.set_wd_mult({})

    def _reject_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` for the first unknown keyword, with a hint for other versions' names."""
        name = next(iter(kwargs))
        message = f"{type(self).__name__}() got an unexpected keyword argument {name!r}"
        hint = self.legacy_kwarg_hints.get(name)
        raise TypeError(f"{message}: {hint}" if hint else message)

    # ----------------------------------------------------------------------------- registry

    @classmethod
    def register(cls, klass: type[Optimizer]) -> type[Optimizer]:
        """Register ``klass`` under ``klass.__name__.lower()`` for :meth:`create_optimizer` (in the
        registry of the class it is called on: MXNet 2.0's here, 1.x's in :mod:`larsopt.mxnet.v1`)."""
        if not isinstance(klass, type):
            raise MXNetAssertionError(f"register expects a class, got {klass!r}")
        name = klass.__name__.lower()
        if name in cls.opt_registry:
            old = cls.opt_registry[name]
            warnings.warn(
                f"WARNING: New optimizer {klass.__module__}.{klass.__name__} is overriding "
                f"existing optimizer {old.__module__}.{old.__name__}",
                stacklevel=2,
            )
        cls.opt_registry[name] = klass
        return klass

    @classmethod
    def create_optimizer(cls, name: str, **kwargs: Any) -> Optimizer:
        """Instantiate the optimizer registered as ``name`` (case-insensitive) with ``kwargs``."""
        if name.lower() in cls.opt_registry:
            return cls.opt_registry[name.lower()](**kwargs)
        raise ValueError(f"Cannot find optimizer {name}")

    # ----------------------------------------------------------------------------- lr / wd

    @property
    def learning_rate(self) -> float:
        """The current global lr: ``lr_scheduler(num_update)`` if set, else ``lr``."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler(self.num_update)
        return self.lr

    def set_learning_rate(self, lr: float) -> None:
        """Set the global lr; raises ``UserWarning`` when a scheduler owns the lr (as MXNet)."""
        if self.lr_scheduler is not None:
            raise UserWarning(
                "LRScheduler of the optimizer has already been defined. Note that set_learning_rate can "
                "mutate the value of the learning rate of the optimizer only when the LRScheduler of the "
                "optimizer is undefined."
            )
        _checks.real("learning_rate", lr)
        self.lr = lr

    def set_lr_mult(self, args_lr_mult: dict[Index, float]) -> None:
        """Replace the lr multipliers: ``sym``'s ``__lr_mult__`` by name, then ``args_lr_mult``
        (keys are indices or names)."""
        self._check_mults("set_lr_mult", args_lr_mult)
        self.lr_mult = self._symbol_mults("__lr_mult__")
        self.lr_mult.update(args_lr_mult)

    def set_wd_mult(self, args_wd_mult: dict[Index, float]) -> None:
        """Replace the wd multipliers: ``sym``'s ``__wd_mult__`` by name, then ``args_wd_mult``
        (keys are indices or names). MXNet 2.0 has no default zero for biases."""
        self._check_mults("set_wd_mult", args_wd_mult)
        self.wd_mult = self._symbol_mults("__wd_mult__")
        self.wd_mult.update(args_wd_mult)

    @staticmethod
    def _check_mults(method: str, mults: Any) -> None:
        if not isinstance(mults, dict):
            raise TypeError(f"{method} takes a dict {{index or name: multiplier}}, got {type(mults).__name__}")
        for key, value in mults.items():
            _checks.real(f"the multiplier of {key!r} in {method}", value)

    def _symbol_mults(self, attribute: str) -> dict[Index, float]:
        mults: dict[Index, float] = {}
        if self.sym_info:
            attrs, arg_names = self.sym_info
            for name in arg_names:
                if name in attrs and attribute in attrs[name]:
                    mults[name] = float(attrs[name][attribute])
        return mults

    def _set_current_context(self, device_id: int) -> None:
        """Deprecated alias of :meth:`_set_current_device`, as in MXNet 2.0."""
        warnings.warn("Optimizer._set_current_context has been renamed to Optimizer._set_current_device",
                      DeprecationWarning, stacklevel=2)
        self._set_current_device(device_id)

    def _set_current_device(self, device_id: int) -> None:
        """Select the update counters of device ``device_id`` (each device counts separately)."""
        self._index_update_count = self._all_index_update_counts.setdefault(device_id, {})

    def _update_count(self, index: Index | Sequence[Index]) -> None:
        """Count one more update of ``index`` (or of each index of a list) and raise ``num_update``."""
        for idx in index if isinstance(index, (list, tuple)) else [index]:
            count = self._index_update_count.get(idx, self.begin_num_update) + 1
            self._index_update_count[idx] = count
            self.num_update = max(count, self.num_update)

    def _multiplier(self, index: Index, table: dict[Index, float], attribute: str) -> float:
        # MXNet's priority: param_dict, then the index, then the index's name.
        if index in self.param_dict:
            value = getattr(self.param_dict[index], attribute)
            _checks.real(f"param_dict[{index!r}].{attribute}", value)
            return value
        if index in table:
            return table[index]
        if index in self.idx2name:
            return table.get(self.idx2name[index], 1.0)
        return 1.0

    def _base_lr(self) -> float:
        """The global lr of an update call: ``lr_scheduler(num_update)`` (one scheduler call) if a
        scheduler is set, else ``lr``."""
        return self.lr_scheduler(self.num_update) if self.lr_scheduler is not None else self.lr

    def _lrs_from(self, lr: float, indices: Sequence[Index]) -> list[float]:
        """The global ``lr`` times each index's lr multiplier."""
        return [lr * self._multiplier(index, self.lr_mult, "lr_mult") for index in indices]

    def _get_lrs(self, indices: Sequence[Index]) -> list[float]:
        """The lr of each index: the global lr (scheduler called once) times its multiplier."""
        return self._lrs_from(self._base_lr(), indices)

    def _get_lr(self, index: Index) -> float:
        return self._get_lrs([index])[0]

    def _get_wds(self, indices: Sequence[Index]) -> list[float]:
        """The weight decay of each index: ``wd`` times its multiplier."""
        return [self.wd * self._multiplier(index, self.wd_mult, "wd_mult") for index in indices]

    def _get_wd(self, index: Index) -> float:
        return self._get_wds([index])[0]

    # ----------------------------------------------------------------------------- states

    def create_state(self, index: Index, weight: _arrays.ArrayLike) -> Any:
        """The optimizer state of one weight (``None`` in the base class)."""
        return None

    def create_state_multi_precision(self, index: Index, weight: _arrays.ArrayLike) -> Any:
        """The state, with a float32 master copy for float16 weights under ``multi_precision``.

        Returns ``(master_fp32, create_state(index, master_fp32))`` for such weights (MXNet 2.0's
        order), else ``create_state(index, weight)``; warns for float16 without multi_precision.
        """
        _arrays.check_floating(weight, f"weight of index {index!r}")
        is_float16 = _arrays.torch_dtype(weight) == torch.float16
        if self.multi_precision and is_float16:
            master = _arrays.to_dtype(weight, torch.float32)
            return (master, self.create_state(index, master))
        if is_float16:
            warnings.warn(FLOAT16_WITHOUT_MASTER_MESSAGE, UserWarning, stacklevel=2)
        return self.create_state(index, weight)

    # ----------------------------------------------------------------------------- updates

    def step(self, indices: Sequence[Index], weights: Sequence[Any], grads: Sequence[Any],
             states: Sequence[Any]) -> None:
        """One update of each weight with the unfused implementation."""
        raise NotImplementedError

    def fused_step(self, indices: Sequence[Index], weights: Sequence[Any], grads: Sequence[Any],
                   states: Sequence[Any]) -> None:
        """One update of each weight with the fused implementation."""
        raise NotImplementedError

    def update(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """Update the weights in place: ``fused_step`` if ``use_fused_step``, else ``step``.

        Takes lists (or tuples) of indices, weights, grads and states, or one of each.
        """
        indices, weights, grads, states = as_lists(indices, weights, grads, states)
        if self.use_fused_step:
            self.fused_step(indices, weights, grads, states)
        else:
            self.step(indices, weights, grads, states)

    def update_multi_precision(self, indices: Any, weights: Any, grads: Any, states: Any) -> None:
        """:meth:`update` with the states of :meth:`create_state_multi_precision`."""
        self.update(indices, weights, grads, states)

    # ----------------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["param_dict"]  # it holds the model's parameters; a trainer sets it again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__ = state
        self.param_dict = {}


def aggregates_everything(aggregate_num: Any) -> bool:
    """Whether ``aggregate_num`` means one call with every weight (``numpy.inf``, ``float('inf')``)."""
    return isinstance(aggregate_num, float) and math.isinf(aggregate_num) and aggregate_num > 0


def _described(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def paired_lists(indices: Any, **arguments: Any) -> tuple[list[int | str], ...]:
    """The indices (as :func:`as_index` keys) and each keyword argument as lists of equal length,
    from one index and one of each, or from lists (or tuples) of them."""
    if not isinstance(indices, (list, tuple)):
        return ([as_index(indices)], *([value] for value in arguments.values()))
    for name, values in arguments.items():
        if not isinstance(values, (list, tuple)):
            # A single array would be iterated by rows, each row taken for a weight.
            raise TypeError(f"the index is a list of {len(indices)}, so {name} must be a list (or tuple) of as "
                            f"many, got {_described(values)}")
    lengths = [len(indices), *(len(values) for values in arguments.values())]
    if len(set(lengths)) != 1:
        raise ValueError(f"indices, {', '.join(arguments)} must have the same length, got "
                         f"{', '.join(map(str, lengths))}")
    return ([as_index(index) for index in indices], *(list(values) for values in arguments.values()))


def as_lists(indices: Any, weights: Any, grads: Any, states: Any) -> tuple[list, ...]:
    """:func:`paired_lists` of the weights, grads and states of an update call."""
    return paired_lists(indices, weights=weights, grads=grads, states=states)


register = Optimizer.register
create = Optimizer.create_optimizer
