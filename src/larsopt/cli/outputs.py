"""Output folders and crash-safe file writes.

Every file is written to a temporary file in the same folder and moved over the old one with
``os.replace`` (atomic on POSIX and Windows), so a kill at any moment leaves either the previous
complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from larsopt.cli.errors import UsageError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
TRUST = "trust.png"
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY, CURVES, TRUST)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write(path, lambda file: file.write((json.dumps(value, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, lambda file: file.write(text.encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path``, atomically."""
    atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise UsageError(f"--resume: cannot read {path} ({type(error).__name__}); it is not a larsopt "
                         "checkpoint or it is damaged") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise UsageError(f"--resume: {path} is not a larsopt train checkpoint")
    return state


def default_run_folder(label: str, root: Path = Path("runs")) -> Path:
    """A new folder name under ``root``: ``<UTC time>-<label>``, with ``-2``, ``-3``... when taken."""
    stem = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    candidate, number = root / stem, 1
    while candidate.exists():
        number += 1
        candidate = root / f"{stem}-{number}"
    return candidate


def check_new_output(folder: Path, overwrite: bool, files: Iterable[str]) -> None:
    """Refuse an output folder that is a file, or that is non-empty unless ``overwrite``.

    Writes nothing: called before any work so a refused run changes nothing on disk.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UsageError(f"--out {folder}: folder exists and is not empty; pass --overwrite to replace "
                         f"its {', '.join(files)}, or --resume to continue its run")


def prepare_output(folder: Path, files: Iterable[str]) -> None:
    """Create ``folder`` and remove the given files of an earlier run (the user chose to overwrite
    them), so that an old checkpoint can never be resumed with new metrics."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {folder}: cannot create the folder ({error.strerror})") from None
    for name in files:
        (folder / name).unlink(missing_ok=True)
