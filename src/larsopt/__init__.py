"""larsopt: LARS (layer-wise adaptive rate scaling) for PyTorch, exact and fast.

* :class:`larsopt.LARS`: a ``torch.optim.Optimizer``.
* :func:`larsopt.param_groups`: groups with independent trust-ratio and weight-decay exclusion.
* :func:`larsopt.functional.lars`: the functional core every front-end calls.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["LARS", "param_groups", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `larsopt --help` (the command line's own modules) needs no torch.
    if name in ("LARS", "param_groups"):
        module = importlib.import_module("larsopt.optim" if name == "LARS" else "larsopt.grouping")
        value = globals()[name] = getattr(module, name)
        return value
    try:  # submodules (larsopt.functional, larsopt.options, ...) as attributes, as an eager import gave them
        return importlib.import_module(f"larsopt.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"larsopt.{name}":
            raise
    raise AttributeError(f"module 'larsopt' has no attribute {name!r}")
