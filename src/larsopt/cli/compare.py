"""``larsopt compare``: LARS against SGD as the batch grows, same data, model and epochs.

Both optimizers use the ``larsopt train`` recipe (warm-up, schedule, momentum, weight decay,
exclusions, label smoothing); only the optimizer and its learning rate differ: LARS keeps its
peak lr at every batch size, SGD follows the linear scaling rule (lr 0.1 * batch / 256) with the
same warm-up (Goyal et al. 2017).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from larsopt.cli import data, models, outputs, plots
from larsopt.cli.options import COMPARE_DEFAULTS, DEFAULT_LR, DEFAULTS, batch_size_list
from larsopt.cli.progress import Progress
from larsopt.cli.train import given_options, resolve_runtime, versions
from larsopt.cli.training import OPTIMIZERS, RunConfig, StopRequest, Trainer

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


def table(rows: list[dict[str, Any]]) -> str:
    """Batch sizes down, one accuracy and one time column per optimizer."""
    sizes = sorted({row["batch_size"] for row in rows})
    by_key = {(row["optimizer"], row["batch_size"]): row for row in rows}
    header = f"{'batch':>6} {'steps':>6}" + "".join(
        f" {name.upper() + ' acc':>9} {name.upper() + ' lr':>8} {name.upper() + ' s':>7}" for name in OPTIMIZERS)
    lines = [header, "-" * len(header)]
    for size in sizes:
        steps = by_key[(OPTIMIZERS[0], size)]["steps"]
        cells = "".join(f" {by_key[(name, size)]['final_test_accuracy']:>9.4f} {by_key[(name, size)]['peak_lr']:>8.4g}"
                        f" {by_key[(name, size)]['wall_time_s']:>7.1f}" for name in OPTIMIZERS)
        lines.append(f"{size:>6} {steps:>6}{cells}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt compare``; returns the exit code."""
    runtime = resolve_runtime(args)
    settings = {**DEFAULTS, **{"epochs": COMPARE_DEFAULTS["epochs"]}, **given_options(args)}
    batch_sizes = args.batch_sizes or batch_size_list(COMPARE_DEFAULTS["batch_sizes"])
    folder = Path(args.out) if args.out is not None else outputs.default_run_folder(
        f"compare-{settings['data'].partition(':')[0]}-{settings['model']}")
    outputs.check_new_output(folder, args.overwrite, (COMPARE_JSON, COMPARE_PNG))
    plots.require_matplotlib()
    dataset = data.load(settings["data"])
    configs = [RunConfig(**{**settings, "optimizer": optimizer, "batch_size": size, "lr": DEFAULT_LR[optimizer]})
               for size in batch_sizes for optimizer in OPTIMIZERS]
    # Building the model once first turns a model/data mismatch into an error before any folder exists.
    models.build(settings["model"], dataset.input_shape, dataset.num_classes)
    outputs.prepare_output(folder, (COMPARE_JSON, COMPARE_PNG))

    rows: list[dict[str, Any]] = []
    stop = StopRequest()
    with stop.installed():
        for config in configs:
            trainer = Trainer(config, dataset, runtime)
            label = f"{config.optimizer.upper()} batch {config.batch_size}"
            progress = Progress(trainer.total_steps, 0, config.epochs, quiet=args.quiet, label=label)
            try:
                completed = trainer.run(stop, on_step=lambda loss, accuracy, size=config.batch_size:
                                        progress.step(loss, accuracy, size),
                                        on_epoch=lambda row: None, on_checkpoint=None)
            finally:
                progress.close()
            if not completed:
                raise KeyboardInterrupt
            result = trainer.result(interrupted=False)
            best = result.best
            rows.append({
                "optimizer": config.optimizer, "batch_size": config.batch_size, "steps": trainer.total_steps,
                "peak_lr": config.peak_lr, "final_test_accuracy": result.final_test_accuracy,
                "best_test_accuracy": best["test_accuracy"], "final_train_loss": result.metrics[-1]["train_loss"],
                "wall_time_s": result.wall_time_s, "samples_per_s": result.samples_per_s,
                "test_accuracy_per_epoch": [row["test_accuracy"] for row in result.metrics],
            })
            if not args.quiet:
                print(f"{label:<18} test accuracy {result.final_test_accuracy:.4f}  peak lr {config.peak_lr:.4g}  "
                      f"{result.wall_time_s:.1f} s", flush=True)

    common = {key: value for key, value in settings.items() if key not in ("optimizer", "batch_size", "lr")}
    outputs.write_json(folder / COMPARE_JSON, {
        "settings": common, "lr": {"lars": DEFAULT_LR["lars"], "sgd_per_256": DEFAULT_LR["sgd"]},
        "batch_sizes": batch_sizes, "runs": rows, "device": str(runtime.device), "threads": runtime.threads,
        "versions": versions()})
    plots.compare(folder / COMPARE_PNG, rows,
                  f"LARS (lr {DEFAULT_LR['lars']:g}) vs SGD (lr 0.1 x batch/256), {settings['model']} on "
                  f"{dataset.name}, {settings['epochs']} epochs")
    print(table(rows))
    print(f"outputs in {folder}")
    return 0
