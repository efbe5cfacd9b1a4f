"""The peers' own LARS classes, loaded from their installed files without their packages' imports
(``import timm`` needs torchvision, which does not import beside this torch; Lightning Bolts'
package needs Lightning). Each loader returns ``None`` when the peer is not installed."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def _installed_file(distribution: str, relative: str) -> Path | None:
    try:
        from importlib.metadata import PackageNotFoundError, distribution as find
        files = find(distribution).files or []
    except PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace("\\", "/") == relative:
            return Path(file.locate())
    return None


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timm_lars() -> Any:
    """``timm.optim.Lars`` (``pip install --no-deps timm``), with the ``_helpers`` it imports."""
    lars = _installed_file("timm", "timm/optim/lars.py")
    if lars is None:
        return None
    package = types.ModuleType("peer_timm_optim")
    package.__path__ = [str(lars.parent)]
    sys.modules["peer_timm_optim"] = package
    _load("peer_timm_optim._helpers", lars.with_name("_helpers.py"))
    return _load("peer_timm_optim.lars", lars).Lars


def bolts_lars() -> Any:
    """Lightning Bolts' ``LARS`` (``pip install --no-deps lightning-bolts``); its ``under_review``
    decorator (a warning) is replaced by the identity."""
    lars = _installed_file("lightning-bolts", "pl_bolts/optimizers/lars.py") or \
        _installed_file("lightning_bolts", "pl_bolts/optimizers/lars.py")
    if lars is None:
        return None
    for name in ("pl_bolts", "pl_bolts.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    stability = types.ModuleType("pl_bolts.utils.stability")
    stability.under_review = lambda: (lambda thing: thing)
    sys.modules["pl_bolts.utils.stability"] = stability
    return _load("peer_bolts_lars", lars).LARS


def pytorch_optimizer_lars() -> Any:
    try:
        from pytorch_optimizer.optimizer.lars import LARS
    except ImportError:
        return None
    return LARS
