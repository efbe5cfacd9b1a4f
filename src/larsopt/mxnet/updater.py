"""MXNet 2.0's ``Updater`` (``mxnet.optimizer.updater``): states per index and the call grouping."""

from __future__ import annotations

import pickle
from typing import Any

from torch import Tensor

from larsopt.mxnet import _arrays
from larsopt.mxnet.optimizer import Index, Optimizer, aggregates_everything, paired_lists


class Updater:
    """Keeps one state per index, created at its first update, and calls the optimizer.

    ``updater(indices, grads, weights)`` (note MXNet's argument order) makes these calls to
    ``optimizer.update_multi_precision``:

    * ``aggregate_num <= 1``: one call per weight.
    * ``aggregate_num`` an int > 1: the weights grouped by dtype (first-seen order), each group
      in consecutive chunks of ``aggregate_num``.
    * ``aggregate_num`` infinite: one call with every weight, whatever the dtypes.

    ``aggregate_num`` is read when the updater is made, as in MXNet.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.states: dict[Index, Any] = {}
        self.states_synced: dict[Index, bool] = {}
        self.aggregate_updates = optimizer.aggregate_num > 1

    def __call__(self, index: Any, grad: Any, weight: Any) -> None:
        """Update ``weight`` (one, or a list) in place from ``grad`` for ``index``.

        An index is an int (a NumPy integer or a 0-d integer tensor counts by its value) or a str
        name; a list of indices takes lists (or tuples) of as many grads and weights.
        """
        indices, grads, weights = paired_lists(index, grads=grad, weights=weight)
        if weights:
            self.optimizer._set_current_device(_arrays.device_id(weights[0]))
        for i, idx in enumerate(indices):
            if idx not in self.states:
                self.states[idx] = self.optimizer.create_state_multi_precision(idx, weights[i])
                self.states_synced[idx] = True
            elif not self.states_synced[idx]:
                self.states[idx] = self.sync_state_context(self.states[idx], weights[i])
                self.states_synced[idx] = True

        aggregate_num = self.optimizer.aggregate_num
        if not self.aggregate_updates:
            for i, w, g in zip(indices, weights, grads):
                self.optimizer.update_multi_precision([i], [w], [g], [self.states[i]])
        elif aggregates_everything(aggregate_num):
            self.optimizer.update_multi_precision(indices, weights, grads, [self.states[i] for i in indices])
        else:
            by_dtype: dict[Any, list[int]] = {}
            for position, w in enumerate(weights):
                by_dtype.setdefault(_arrays.torch_dtype(w), []).append(position)
            for positions in by_dtype.values():
                for start in range(0, len(positions), int(aggregate_num)):
                    chunk = positions[start:start + int(aggregate_num)]
                    self.optimizer.update_multi_precision(
                        [indices[p] for p in chunk],
                        [weights[p] for p in chunk],
                        [grads[p] for p in chunk],
                        [self.states[indices[p]] for p in chunk],
                    )

    def sync_state_context(self, state: Any, weight: Any) -> Any:
        """``state`` moved to ``weight``'s device (tensors inside tuples and lists too)."""
        if isinstance(state, Tensor):
            return state.to(weight.device) if isinstance(weight, Tensor) else state
        if isinstance(state, (tuple, list)):
            return type(state)(self.sync_state_context(s, weight) for s in state)
        return state

    def set_states(self, states: bytes) -> None:
        """Load states from :meth:`get_states` (with the optimizer, if it was dumped too).

        Only unpickle data you trust: like MXNet, this uses :mod:`pickle`.
        """
        loaded = pickle.loads(states)
        if isinstance(loaded, tuple) and len(loaded) == 2:
            self.states, self.optimizer = loaded
        else:
            self.states = loaded
        self.states_synced = dict.fromkeys(self.states, False)

    def get_states(self, dump_optimizer: bool = False) -> bytes:
        """The states pickled (with the optimizer if ``dump_optimizer``; its ``param_dict`` is left out)."""
        return pickle.dumps((self.states, self.optimizer) if dump_optimizer else self.states)


def get_updater(optimizer: Optimizer) -> Updater:
    """An :class:`Updater` for ``optimizer`` (MXNet's ``get_updater``)."""
    return Updater(optimizer)
