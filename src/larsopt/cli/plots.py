"""The pictures: ``curves.png``, ``trust.png`` and ``compare.png``.

Figures are drawn with ``matplotlib.figure.Figure`` (no pyplot), so no GUI backend is touched and
the global matplotlib state of a calling program is left alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from larsopt.cli.errors import UsageError
from larsopt.cli.outputs import atomic_write


def require_matplotlib() -> None:
    """Fail early, before training, when matplotlib (the ``train`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("the pictures need matplotlib: pip install 'larsopt[train]'") from None


def _save(figure: Any, path: Path) -> None:
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))


def curves(path: Path, metrics: list[dict[str, Any]], title: str) -> None:
    """Loss, accuracy and learning rate against epoch."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in metrics]
    figure = Figure(figsize=(11, 3.4), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3)
    loss_axes.plot(epochs, [row["train_loss"] for row in metrics], label="train (optimised loss)")
    loss_axes.plot(epochs, [row["test_loss"] for row in metrics], label="test (cross-entropy)")
    loss_axes.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    accuracy_axes.plot(epochs, [row["train_accuracy"] for row in metrics], label="train")
    accuracy_axes.plot(epochs, [row["test_accuracy"] for row in metrics], label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.0), title="accuracy")
    lr_axes.plot(epochs, [row["lr"] for row in metrics], color="tab:green")
    lr_axes.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    _save(figure, path)


def trust_heatmap(path: Path, names: list[str], history: list[list[float]], title: str) -> None:
    """Per-layer trust ratio (rows) over epochs (columns), log colour scale."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 1.6 + 0.32 * max(len(names), 1)), layout="constrained")
    axes = figure.subplots()
    if names and history:
        columns = [[history[epoch][layer] for epoch in range(len(history))] for layer in range(len(names))]
        finite = [value for row in columns for value in row if math.isfinite(value) and value > 0]
        norm = LogNorm(vmin=min(finite), vmax=max(finite)) if finite else None
        image = axes.imshow(columns, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm,
                            extent=(0.5, len(history) + 0.5, len(names) - 0.5, -0.5))
        figure.colorbar(image, ax=axes, label="trust ratio (epoch mean)")
        axes.set_yticks(range(len(names)), names, fontsize=8)
    else:
        axes.text(0.5, 0.5, "no parameter gets a trust ratio (all excluded)", ha="center", va="center")
    axes.set(xlabel="epoch", title=title)
    _save(figure, path)


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<")


def compare(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Test accuracy (mean and standard deviation over seeds) and wall time (fastest seed) against
    batch size, one line per optimizer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.5, 3.8), layout="constrained")
    # The legend gets an axes of its own: with ten optimizers it would cover the lines.
    accuracy_axes, time_axes, legend_axes = figure.subplots(1, 3, width_ratios=(1, 1, 0.3))
    for number, optimizer in enumerate(dict.fromkeys(row["optimizer"] for row in rows)):
        mine = sorted((row for row in rows if row["optimizer"] == optimizer), key=lambda row: row["batch_size"])
        sizes = [row["batch_size"] for row in mine]
        # Optimizers of one formula family can give the same numbers: markers of their own keep
        # each line visible where lines coincide.
        marker = _MARKERS[number % len(_MARKERS)]
        accuracy_axes.errorbar(sizes, [row["final_test_accuracy"] for row in mine],
                               yerr=[row["final_test_accuracy_std"] for row in mine], marker=marker, capsize=3,
                               label=optimizer, alpha=0.85)
        time_axes.plot(sizes, [row["wall_time_s"] for row in mine], marker=marker, label=optimizer, alpha=0.85)
    sizes = sorted({row["batch_size"] for row in rows})
    for axes in (accuracy_axes, time_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.minorticks_off()
        axes.set_xlabel("batch size")
        axes.grid(alpha=0.3)
    legend_axes.axis("off")
    legend_axes.legend(*accuracy_axes.get_legend_handles_labels(), loc="center left", title="optimizer")
    accuracy_axes.set(ylabel="final test accuracy", title="accuracy after the same number of epochs")
    time_axes.set(ylabel="wall time (s), fastest seed", title="training time")
    figure.suptitle(title)
    _save(figure, path)
