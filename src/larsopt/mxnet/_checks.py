"""Argument checks shared by the MXNet front-end: ``TypeError`` for a wrong type, ``ValueError``
for a bad value, each naming the argument. Real numbers include NumPy scalars (``np.float32``,
``np.int64``); booleans are not numbers here."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def real(name: str, value: Any, *, none_ok: bool = False) -> None:
    """``value`` must be a finite real number (or ``None`` when ``none_ok``)."""
    if value is None and none_ok:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        expected = "None or a finite real number" if none_ok else "a finite real number"
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")


def integer(name: str, value: Any, *, minimum: int, alternative: str = "") -> None:
    """``value`` must be an integer (Python or NumPy) ``>= minimum`` (``alternative``: what else
    the caller accepts, for the message)."""
    expected = f"an int >= {minimum}" + (f" or {alternative}" if alternative else "")
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def boolean(name: str, value: Any, *, none_ok: bool = False) -> None:
    """``value`` must be ``True`` or ``False`` (NumPy's too), or ``None`` when ``none_ok``."""
    if value is None and none_ok:
        return
    if not isinstance(value, (bool, np.bool_)):
        expected = "None, True or False" if none_ok else "True or False"
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
