"""``larsopt train --tensorboard DIR``: TensorBoard event files, written by rank 0.

TensorBoard is an optional extra (``pip install "larsopt[tensorboard]"``): this module imports it
only when a run asks for it, and :func:`require` refuses the option before anything is written
when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from larsopt.cli.errors import OutputError, UsageError
from larsopt.telemetry import Accumulator, to_tensorboard

INSTALL_HINT = 'pip install "larsopt[tensorboard]"'
# metrics.jsonl's columns -> the tags they get, grouped as TensorBoard shows them.
SCALARS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_accuracy": "accuracy/train",
           "test_accuracy": "accuracy/test", "lr": "lr"}


def require(folder: str) -> None:
    """Fail early, before training, when TensorBoard is missing or ``folder`` cannot be a folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(f"--tensorboard {folder}: TensorBoard is not installed; {INSTALL_HINT}") from None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensorboard {folder}: a file of that name exists; give a folder")


class TensorBoardLog:
    """One run's event files in ``folder``: per epoch (at its last step) the scalars of
    :data:`SCALARS` and, for a LARS optimizer, ``larsopt.telemetry.to_tensorboard`` of an
    accumulator over the epoch's steps. ``resumed_step``: the step a resumed run continues from;
    the events after it that an interrupted process logged after its checkpoint are hidden
    (those up to it came before the checkpoint: an epoch's row is logged before its checkpoint)."""

    def __init__(self, folder: str, optimizer: torch.optim.Optimizer, reports_trust: bool,
                 resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(folder, purge_step=resumed_step + 1 if resumed_step else None)
        except OSError as error:
            raise OutputError(f"--tensorboard {folder}: cannot write there "
                              f"({error.strerror or type(error).__name__})") from None
        self.accumulator = Accumulator(optimizer) if reports_trust else None

    def epoch(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for column, tag in SCALARS.items():
            self.writer.add_scalar(tag, float(row[column]), step)
        if self.accumulator is not None:
            to_tensorboard(self.writer, self.accumulator, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
