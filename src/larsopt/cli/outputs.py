"""Output folders and crash-safe file writes.

Every file is written to a temporary file in the same folder and moved over the old one with
``os.replace`` (atomic on POSIX and Windows), so a kill at any moment leaves either the previous
complete file or the new complete file, never a torn one. Files get the permissions the user's
umask gives (``mkstemp`` alone would make them private).

A command claims its output folder (:func:`claim`) before it writes: a new folder is created
atomically (two runs started in the same second, or given the same new ``--out``, never share
one), and a lock held for the whole command keeps a second run out of a folder in use. A new run
writes into a staging folder inside it until it has a checkpoint (:meth:`OutputFolder.commit`):
if it fails before that, the staging folder goes and an earlier run's files are untouched.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are still created atomically
    fcntl = None  # type: ignore[assignment]

import torch

from larsopt.cli.errors import UsageError

CHECKPOINT = "checkpoint.pt"
# Under FSDP: the sharded model and optimizer, one sub-folder per checkpoint, named in checkpoint.pt.
SHARDED_CHECKPOINTS = "checkpoint.dcp"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
TRUST = "trust.png"
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY, CURVES, TRUST)
# What a train run may leave, and --overwrite replaces.
RUN_OUTPUTS = (*RUN_FILES, SHARDED_CHECKPOINTS)
LOCK = ".larsopt.lock"
STAGING = ".larsopt-new"
# larsopt's own bookkeeping: a folder holding only these (say, after a kill) counts as empty.
BOOKKEEPING = (LOCK, STAGING)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) replaced by ``None``: JSON
    has no NaN, and ``json.dumps`` would write a bare ``NaN`` that other readers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (non-finite floats as ``null``), atomically."""
    text = json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (non-finite floats as ``null``), atomically."""
    text = "".join(json.dumps(finite_or_none(row), allow_nan=False) + "\n" for row in rows)
    atomic_write(path, lambda file: file.write(text.encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path``, atomically. Serialised in memory first, so that a
    failed write (a full disk) raises the ``OSError`` that says so."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda file: file.write(buffer.getbuffer()))


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


def _user_files(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name not in BOOKKEEPING]


def check_new_output(folder: Path, overwrite: bool, files: Iterable[str]) -> None:
    """Refuse an output folder that is a file, or that is non-empty unless ``overwrite``.

    Writes nothing: called before any work so a refused run changes nothing on disk.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: is a file, not a folder")
    if folder.is_dir() and _user_files(folder) and not overwrite:
        raise UsageError(f"--out {folder}: folder exists and is not empty; pass --overwrite to replace "
                         f"its {', '.join(files)}, or --resume to continue its run")


def _cannot_write(folder: Path, error: OSError) -> UsageError:
    return UsageError(f"--out {folder}: cannot write there ({error.strerror or type(error).__name__})")


def _new_default_folder(label: str, root: Path) -> Path:
    """Create ``root/<UTC time>-<label>`` (``-2``, ``-3``... when taken). ``mkdir`` fails on an
    existing folder, so of two runs started in the same second each gets its own."""
    stem = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_write(root, error) from None
    number = 1
    while True:
        candidate = root / (stem if number == 1 else f"{stem}-{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
        except OSError as error:
            raise _cannot_write(candidate, error) from None


class OutputFolder:
    """A claimed output folder: :meth:`path` says where to write each file."""

    def __init__(self, folder: Path, files: tuple[str, ...], staged: bool) -> None:
        self.folder = folder
        self.files = files
        self.staged = staged

    def path(self, name: str) -> Path:
        """Where to write ``name`` now: the staging folder until :meth:`commit`, then the folder."""
        return self.folder / STAGING / name if self.staged else self.folder / name

    def commit(self) -> None:
        """Put the staged files in place of the earlier run's: first remove its files that this
        run has not written yet (so nothing of the two runs mixes), then move this run's files in,
        the checkpoint last (a resume always rewrites the rest from the checkpoint)."""
        if not self.staged:
            return
        staging = self.folder / STAGING
        written = [name for name in self.files if (staging / name).exists()]
        for name in self.files:
            if name not in written:
                _remove(self.folder / name)
        for name in sorted(written, key=lambda name: name == CHECKPOINT):
            if (staging / name).is_dir():
                _remove(self.folder / name)  # os.replace moves a folder only onto nothing or an empty one
            os.replace(staging / name, self.folder / name)
        shutil.rmtree(staging)
        self.staged = False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def new_sharded_checkpoint(out: OutputFolder, step: int) -> Path:
    """A new, unique folder for the sharded checkpoint of ``step`` (unique, so that a
    checkpoint.pt never names the shards of another run or another save)."""
    parent = out.path(SHARDED_CHECKPOINTS)
    parent.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"step-{step:09d}-", dir=parent))
    os.chmod(folder, 0o777 & ~_umask())  # (mkdtemp makes it private)
    return folder


def remove_other_sharded_checkpoints(folder: Path, kept: str) -> None:
    """Remove the sharded checkpoints in ``folder`` other than ``kept`` (the one checkpoint.pt
    names now)."""
    parent = folder / SHARDED_CHECKPOINTS
    if parent.is_dir():
        for path in parent.iterdir():
            if path.name != kept:
                _remove(path)


def _lock(folder: Path) -> int | None:
    """Hold an exclusive lock on ``folder``'s lock file; released when the process ends, however
    it ends. ``None`` where the platform has no ``fcntl``."""
    if fcntl is None:
        return None
    path = folder / LOCK
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise UsageError(f"--out {folder}: another larsopt command is writing into this folder") from None
        # The holder before us may have removed the file after we opened it: lock the one in place.
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def _outermost_missing(path: Path) -> Path | None:
    missing = None
    absolute = path.absolute()
    for candidate in (absolute, *absolute.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_created(folder: Path, outermost: Path | None) -> None:
    """Remove ``folder`` and the empty folders above it up to ``outermost`` (those this claim
    made)."""
    shutil.rmtree(folder, ignore_errors=True)
    if outermost is None:
        return
    for parent in folder.absolute().parents:
        if not parent.is_relative_to(outermost):
            break
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def claim(folder: Path | None, *, label: str, files: tuple[str, ...], resume: bool = False, overwrite: bool = False,
          root: Path = Path("runs")) -> Iterator[OutputFolder]:
    """Claim the output folder for the block: ``folder`` (created if missing), or a new folder
    under ``root`` named after the time and ``label``. A new run (``resume`` false) writes into
    the staging folder until it commits; if the block fails before that, everything this claim
    created is removed again, and the folder is as it was."""
    created = folder is None
    # The outermost folder this claim creates: what a failed new run removes again.
    outermost = _outermost_missing(root if folder is None else folder)
    try:
        if folder is None:
            folder = _new_default_folder(label, root)
        else:
            try:
                folder.mkdir(parents=True)
                created = True
            except FileExistsError:
                pass
        descriptor = _lock(folder)
    except BaseException as error:
        if created and folder is not None:
            _remove_created(folder, outermost)
        if isinstance(error, OSError):
            raise _cannot_write(folder or root, error) from None
        raise
    output = OutputFolder(folder, files, staged=not resume)
    try:
        # Checked again under the lock: another run may have filled the folder since the first look.
        if not (resume or overwrite or created):
            check_new_output(folder, overwrite, files)
        try:
            if resume:
                probe, name = tempfile.mkstemp(prefix=".larsopt-probe.", dir=folder)
                os.close(probe)
                os.unlink(name)
            else:
                staging = folder / STAGING
                shutil.rmtree(staging, ignore_errors=True)  # left by a run killed before it committed
                staging.mkdir()
        except OSError as error:
            raise _cannot_write(folder, error) from None
        yield output
    except BaseException:
        if output.staged:
            shutil.rmtree(folder / STAGING, ignore_errors=True)
            if created:
                _remove_created(folder, outermost)
        raise
    finally:
        if descriptor is not None:
            if folder.exists():
                (folder / LOCK).unlink(missing_ok=True)
            os.close(descriptor)
