"""Progress output: a tqdm bar (loss, accuracy, samples/s, ETA) on a terminal, one plain line per
epoch otherwise (logs, pipes, CI), nothing with ``--quiet``."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Reports steps and epochs of one run of ``total_steps`` steps (``done_steps`` already done)."""

    def __init__(self, total_steps: int, done_steps: int, epochs: int, quiet: bool, label: str = "",
                 stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.done_steps = done_steps
        self.epochs = epochs
        self.quiet = quiet
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        self.started = time.perf_counter()
        self.steps_at_start = done_steps
        self.samples = 0
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=done_steps, desc=label or "train", unit="step",
                                dynamic_ncols=True, leave=True)

    def step(self, loss: float, accuracy: float, samples: int) -> None:
        """One optimisation step of ``samples`` samples done."""
        self.done_steps += 1
        self.samples += samples
        if self.bar is not None:
            # Measured here over every step so far: tqdm's own rate is unknown (0) at first.
            seconds = time.perf_counter() - self.started
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}",
                                 samples_s=f"{self.samples / seconds:.0f}" if seconds > 0 else "-", refresh=False)
            self.bar.update(1)

    def epoch(self, row: dict[str, Any]) -> None:
        """One epoch done: a line with its metrics and the estimated time left."""
        if self.quiet:
            return
        steps_run = self.done_steps - self.steps_at_start
        seconds_left = (time.perf_counter() - self.started) / steps_run * (self.total_steps - self.done_steps) \
            if steps_run else 0.0
        speed = f"{row['samples_per_s']:.0f} samples/s" if row["samples_per_s"] else "-"
        line = (f"{self.label + ' ' if self.label else ''}epoch {row['epoch']}/{self.epochs}  "
                f"loss {row['train_loss']:.4f}  train_acc {row['train_accuracy']:.4f}  "
                f"test_acc {row['test_accuracy']:.4f}  lr {row['lr']:.4g}  {speed}  eta {_duration(seconds_left)}")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the bar (if any) from the terminal state."""
        if self.bar is not None:
            self.bar.close()
