"""``larsopt compare``: LARS against SGD as the batch grows, same data, model and epochs.

Both optimizers use the ``larsopt train`` recipe (warm-up, schedule, momentum, weight decay,
exclusions, label smoothing); only the optimizer and its learning rate differ: LARS keeps its
peak lr at every batch size, SGD follows the linear scaling rule (lr 0.1 * batch / 256) with the
same warm-up (Goyal et al. 2017). Each point is the mean over three seeds (``--seed`` and the two
after it): on digits one test image is 0.28 points of accuracy, about the gap being measured.
"""

from __future__ import annotations

import argparse
import statistics
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
    """Batch sizes down; per optimizer the mean +- standard deviation of the final test accuracy
    over the seeds, the peak lr and the time of the fastest run."""
    sizes = sorted({row["batch_size"] for row in rows})
    by_key = {(row["optimizer"], row["batch_size"]): row for row in rows}
    header = f"{'batch':>6} {'steps':>6}" + "".join(
        f" {name.upper() + ' accuracy':>16} {'lr':>7} {'s':>5}" for name in OPTIMIZERS)
    lines = [header, "-" * len(header)]
    for size in sizes:
        cells = ""
        for name in OPTIMIZERS:
            row = by_key[(name, size)]
            accuracy = f"{row['final_test_accuracy']:.4f} +- {row['final_test_accuracy_std']:.4f}"
            cells += f" {accuracy:>16} {row['peak_lr']:>7.4g} {row['wall_time_s']:>5.1f}"
        lines.append(f"{size:>6} {by_key[(OPTIMIZERS[0], size)]['steps']:>6}{cells}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt compare``; returns the exit code."""
    runtime = resolve_runtime(args)
    settings = {**DEFAULTS, **{"epochs": COMPARE_DEFAULTS["epochs"]}, **given_options(args)}
    batch_sizes = args.batch_sizes or batch_size_list(COMPARE_DEFAULTS["batch_sizes"])
    seeds = [settings["seed"] + offset for offset in range(COMPARE_DEFAULTS["seeds"])]
    folder = Path(args.out) if args.out is not None else outputs.default_run_folder(
        f"compare-{settings['data'].partition(':')[0]}-{settings['model']}")
    outputs.check_new_output(folder, args.overwrite, (COMPARE_JSON, COMPARE_PNG))
    plots.require_matplotlib()
    dataset = data.load(settings["data"])
    # Building the model once first turns a model/data mismatch into an error before any folder exists.
    models.build(settings["model"], dataset.input_shape, dataset.num_classes)
    outputs.prepare_output(folder, (COMPARE_JSON, COMPARE_PNG))

    rows: list[dict[str, Any]] = []
    stop = StopRequest()
    with stop.installed():
        for size in batch_sizes:
            for optimizer in OPTIMIZERS:
                results = []
                for seed in seeds:
                    config = RunConfig(**{**settings, "optimizer": optimizer, "batch_size": size,
                                          "lr": DEFAULT_LR[optimizer], "seed": seed})
                    trainer = Trainer(config, dataset, runtime)
                    label = f"{optimizer.upper()} batch {size} seed {seed}"
                    progress = Progress(trainer.total_steps, 0, config.epochs, quiet=args.quiet, label=label)
                    try:
                        completed = trainer.run(
                            stop, on_step=lambda loss, accuracy: progress.step(loss, accuracy, size),
                            on_epoch=lambda row: None, on_checkpoint=None)
                    finally:
                        progress.close()
                    if not completed:
                        raise KeyboardInterrupt
                    results.append(trainer.result(interrupted=False))
                accuracies = [result.final_test_accuracy for result in results]
                rows.append({
                    "optimizer": optimizer, "batch_size": size, "steps": trainer.total_steps,
                    "peak_lr": config.peak_lr, "seeds": seeds,
                    "final_test_accuracy": statistics.mean(accuracies),
                    "final_test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "final_test_accuracy_per_seed": accuracies,
                    "best_test_accuracy_per_seed": [result.best["test_accuracy"] for result in results],
                    "final_train_loss_per_seed": [result.metrics[-1]["train_loss"] for result in results],
                    # The fastest seed: on a shared machine the others measure the neighbours too.
                    "wall_time_s": min(result.wall_time_s for result in results),
                    "wall_time_s_per_seed": [result.wall_time_s for result in results],
                })
                if not args.quiet:
                    print(f"{optimizer.upper():<4} batch {size:<6} test accuracy "
                          f"{' '.join(f'{accuracy:.4f}' for accuracy in accuracies)}  peak lr {config.peak_lr:.4g}",
                          flush=True)

    common = {key: value for key, value in settings.items() if key not in ("optimizer", "batch_size", "lr", "seed")}
    outputs.write_json(folder / COMPARE_JSON, {
        "settings": common, "seeds": seeds, "lr": {"lars": DEFAULT_LR["lars"], "sgd_per_256": DEFAULT_LR["sgd"]},
        "batch_sizes": batch_sizes, "runs": rows, "device": str(runtime.device), "threads": runtime.threads,
        "versions": versions()})
    plots.compare(folder / COMPARE_PNG, rows,
                  f"LARS (lr {DEFAULT_LR['lars']:g}) vs SGD (lr 0.1 x batch/256), {settings['model']} on "
                  f"{dataset.name}, {settings['epochs']} epochs, {len(seeds)} seeds")
    print(table(rows))
    print(f"outputs in {folder}")
    return 0
