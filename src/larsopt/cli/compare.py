"""``larsopt compare``: optimizers side by side as the batch grows, same data, model and epochs.

By default LARS against SGD; ``--optimizers`` names any of ``larsopt train --optimizer``'s, such
as the peers' LARS of ``larsopt.presets``. Every optimizer uses the ``larsopt train`` recipe
(warm-up, schedule, momentum, weight decay, exclusions, label smoothing) as ``larsopt train
--optimizer`` maps it; only the optimizer and its learning rate differ: LARS and the presets keep
their peak lr at every batch size, SGD follows the linear scaling rule (lr 0.1 * batch / 256) with
the same warm-up (Goyal et al. 2017). Each point is the mean over three seeds (``--seed`` and the
two after it): on digits one test image is 0.28 points of accuracy, about the gap being measured.

Every finished run is written to ``compare.json`` at once, so an interrupted compare keeps what it
has done and ``--resume`` runs only the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import torch

from larsopt.cli import data, distributed, outputs, plots
from larsopt.cli.config import DEFAULT_LR, SEED_LIMIT, RunConfig, compare_defaults, optimizer_name
from larsopt.cli.errors import UsageError
from larsopt.cli.options import COMPARE_BATCH_SIZES, COMPARE_OPTIMIZERS, COMPARE_SEEDS
from larsopt.cli.progress import Progress
from larsopt.cli.train import given_options, print_warnings, resolve, versions
from larsopt.cli.training import COMPLETED, STOPPED, StopRequest, Trainer

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"
COMPARE_FILES = (COMPARE_JSON, COMPARE_PNG)
# The settings that differ between the runs of one compare.
_PER_RUN = ("optimizer", "batch_size", "lr", "seed")


def table(rows: list[dict[str, Any]], optimizers: list[str]) -> str:
    """A line per batch size and optimizer (in ``optimizers``' order): the mean +- standard
    deviation of the final test accuracy over the seeds, the peak lr and the time of the fastest
    run."""
    sizes = sorted({row["batch_size"] for row in rows})
    by_key = {(row["optimizer"], row["batch_size"]): row for row in rows}
    width = max(len("optimizer"), *map(len, optimizers))
    header = f"{'batch':>6} {'steps':>6}  {'optimizer':<{width}} {'accuracy':>16} {'lr':>7} {'s':>5}"
    lines = [header, "-" * len(header)]
    for size in sizes:
        for name in optimizers:
            row = by_key[(name, size)]
            accuracy = f"{row['final_test_accuracy']:.4f} +- {row['final_test_accuracy_std']:.4f}"
            lines.append(f"{size:>6} {row['steps']:>6}  {name:<{width}} {accuracy:>16} {row['peak_lr']:>7.4g} "
                         f"{row['wall_time_s']:>5.1f}")
    return "\n".join(lines)


def _point(optimizer: str, size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One point of the table: the runs of every seed at one optimizer and batch size."""
    accuracies = [run["final_test_accuracy"] for run in runs]
    return {
        "optimizer": optimizer, "batch_size": size, "steps": runs[0]["steps"], "peak_lr": runs[0]["peak_lr"],
        "seeds": [run["seed"] for run in runs],
        "final_test_accuracy": statistics.mean(accuracies),
        "final_test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "final_test_accuracy_per_seed": accuracies,
        "best_test_accuracy_per_seed": [run["best_test_accuracy"] for run in runs],
        "final_train_loss_per_seed": [run["final_train_loss"] for run in runs],
        "test_accuracy_per_epoch_per_seed": [run["test_accuracy_per_epoch"] for run in runs],
        "diverged_seeds": [run["seed"] for run in runs if run["status"] != COMPLETED],
        # The fastest seed: on a shared machine the others measure the neighbours too.
        "wall_time_s": min(run["wall_time_s"] for run in runs),
        "wall_time_s_per_seed": [run["wall_time_s"] for run in runs],
    }


class Plan(NamedTuple):
    """What a compare runs: the common settings, the optimizers, batch sizes and seeds, and (with
    ``--resume``) the saved report."""

    base: RunConfig
    optimizers: list[str]
    sizes: list[int]
    seeds: list[int]
    report: dict[str, Any] | None


def _plan(args: argparse.Namespace) -> Plan:
    given = given_options(args, "compare")
    if not args.resume:
        base = resolve(RunConfig(**{**compare_defaults(), **given}))
        print_warnings(base)
        optimizers = args.optimizers or list(COMPARE_OPTIMIZERS)
        sizes = args.batch_sizes or list(COMPARE_BATCH_SIZES)
        return Plan(base, optimizers, sizes, [base.seed + offset for offset in range(COMPARE_SEEDS)], None)
    if args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    if args.out is None:
        raise UsageError("--resume needs --out FOLDER, the folder of the compare to continue")
    path = Path(args.out) / COMPARE_JSON
    try:
        report = json.loads(path.read_text())
        base = resolve(RunConfig.from_saved({**report["settings"], "seed": report["seeds"][0]}))
        sizes, seeds = [int(size) for size in report["batch_sizes"]], [int(seed) for seed in report["seeds"]]
        # (A report written before --optimizers existed compared LARS and SGD.)
        optimizers = [optimizer_name(name) for name in report.get("optimizers", COMPARE_OPTIMIZERS)]
    except FileNotFoundError:
        raise UsageError(f"--resume: no {COMPARE_JSON} in {args.out}") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, argparse.ArgumentTypeError) as error:
        raise UsageError(f"--resume: {path} is not a larsopt compare report ({type(error).__name__})") from None
    typed = resolve(dataclasses.replace(base, **given))
    for name in given:
        if getattr(typed, name) != getattr(base, name):
            raise UsageError(f"--resume: --{name.replace('_', '-')} {getattr(typed, name)} differs from the saved "
                             f"{getattr(base, name)}; leave it out to resume with the saved settings")
    if args.batch_sizes is not None and args.batch_sizes != sizes:
        raise UsageError(f"--resume: --batch-sizes {','.join(map(str, args.batch_sizes))} differs from the saved "
                         f"{','.join(map(str, sizes))}")
    if args.optimizers is not None and args.optimizers != optimizers:
        raise UsageError(f"--resume: --optimizers {','.join(args.optimizers)} differs from the saved "
                         f"{','.join(optimizers)}")
    return Plan(base, optimizers, sizes, seeds, report)


def _lr_text(optimizers: list[str]) -> str:
    """The learning rates of a compare, for the picture's title: "10 (sgd: 0.1 x batch/256)"."""
    rates = ", ".join(sorted({f"{DEFAULT_LR[name]:g}" for name in optimizers if name != "sgd"}))
    scaled = f"{DEFAULT_LR['sgd']:g} x batch/256"
    if "sgd" not in optimizers:
        return rates
    return f"{rates} (sgd: {scaled})" if rates else scaled


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt compare``; returns the exit code."""
    if distributed.detect().launched:
        raise UsageError("larsopt compare runs in one process: start it without torchrun (its runs are small; "
                         "larsopt train runs under torchrun)")
    base, optimizers, sizes, seeds, report = _plan(args)
    if seeds[-1] >= SEED_LIMIT:
        raise UsageError(f"--seed {seeds[0]}: compare uses seeds {seeds[0]}..{seeds[-1]}, which must be below 2^64")
    folder = None if args.out is None else Path(args.out)
    if folder is not None and report is None:
        outputs.check_new_output(folder, args.overwrite, COMPARE_FILES)
    torch.set_num_threads(base.threads)
    plots.require_matplotlib()
    dataset = data.load(base.data, base.image_size)
    too_large = [size for size in sizes if size > len(dataset.x_train)]
    if too_large:
        raise UsageError(f"--batch-sizes: {', '.join(map(str, too_large))} larger than the training set of "
                         f"{dataset.name} ({len(dataset.x_train)} samples)")
    plan = [(optimizer, size, seed) for size in sizes for optimizer in optimizers for seed in seeds]
    configs = {key: dataclasses.replace(base, optimizer=key[0], batch_size=key[1], seed=key[2],
                                        lr=DEFAULT_LR[key[0]]) for key in plan}
    # Building each optimizer's first run checks the model against the data and the optimizer's
    # rules against the model before any folder exists.
    for optimizer in optimizers:
        Trainer(configs[(optimizer, sizes[0], seeds[0])], dataset)
    done = {} if report is None else {(run["optimizer"], run["batch_size"], run["seed"]): run
                                      for run in report["seed_runs"]}
    common = {key: value for key, value in dataclasses.asdict(base).items() if key not in _PER_RUN}
    label = f"compare-{base.data_kind}-{base.model.replace(':', '.')}"
    with outputs.claim(folder, label=label, files=COMPARE_FILES, resume=report is not None,
                       overwrite=args.overwrite) as out:
        def save() -> list[dict[str, Any]]:
            points = [_point(optimizer, size, [done[(optimizer, size, seed)] for seed in seeds])
                      for size in sizes for optimizer in optimizers
                      if all((optimizer, size, seed) in done for seed in seeds)]
            outputs.write_json(out.path(COMPARE_JSON), {
                "settings": common, "optimizers": optimizers, "seeds": seeds, "batch_sizes": sizes,
                "lr": {"sgd_per_256" if name == "sgd" else name: DEFAULT_LR[name] for name in optimizers},
                "complete": len(done) == len(plan), "runs": points,
                "seed_runs": [done[key] for key in plan if key in done],
                "device": base.device, "threads": base.threads, "versions": versions()})
            out.commit()
            return points

        stop = StopRequest()
        with stop.installed():
            for key in plan:
                if key in done:
                    continue
                optimizer, size, seed = key
                trainer = Trainer(configs[key], dataset)
                progress = Progress(trainer.total_steps, 0, base.epochs, quiet=args.quiet,
                                    label=f"{optimizer} batch {size} seed {seed}")
                try:
                    status = trainer.run(stop, on_step=progress.step, on_epoch=lambda row: None, on_checkpoint=None)
                finally:
                    progress.close()
                if status == STOPPED:
                    if done:
                        save()
                    print(f"stopped; {len(done)} of {len(plan)} runs are in {out.path(COMPARE_JSON)}. Continue "
                          f"with: larsopt compare --out {out.folder} --resume")
                    return stop.exit_code
                result = trainer.result(status)
                done[key] = {
                    "optimizer": optimizer, "batch_size": size, "seed": seed, "status": status,
                    "peak_lr": configs[key].peak_lr, "steps": trainer.total_steps,
                    "final_test_accuracy": result.final_test_accuracy,
                    "best_test_accuracy": result.best["test_accuracy"],
                    "final_train_loss": result.metrics[-1]["train_loss"],
                    "test_accuracy_per_epoch": [row["test_accuracy"] for row in result.metrics],
                    "wall_time_s": result.wall_time_s,
                }
                points = save()
                if not args.quiet and seed == seeds[-1]:
                    point = points[-1]
                    print(f"{optimizer:<{max(map(len, optimizers))}} batch {size:<6} test accuracy "
                          f"{' '.join(f'{accuracy:.4f}' for accuracy in point['final_test_accuracy_per_seed'])}  "
                          f"peak lr {point['peak_lr']:.4g}", flush=True)
        points = save()
        plots.compare(out.path(COMPARE_PNG), points, f"{base.model} on {dataset.name}, {base.epochs} epochs, "
                      f"{len(seeds)} seeds; lr {_lr_text(optimizers)}")
    if not args.quiet:
        print(table(points, optimizers))
    print(f"outputs in {out.folder}")
    return 0
