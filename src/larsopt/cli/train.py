"""``larsopt train``: one run, its files, and resuming it."""

from __future__ import annotations

import argparse
import math
import platform
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

import larsopt
from larsopt.cli import INTERRUPTED_EXIT_CODE, data, outputs, plots
from larsopt.cli.errors import UsageError
from larsopt.cli.options import DEFAULT_LR, DEFAULTS
from larsopt.cli.progress import Progress
from larsopt.cli.training import RunConfig, RunResult, Runtime, StopRequest, Trainer

CONFIG_FIELDS = tuple(field.name for field in fields(RunConfig))


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options the user typed (parsed with default None)."""
    return {name: value for name, value in vars(args).items() if name in CONFIG_FIELDS and value is not None}


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Typed options over the documented defaults."""
    given = given_options(args)
    optimizer = given.get("optimizer", DEFAULTS["optimizer"])
    return RunConfig(**{**DEFAULTS, "lr": DEFAULT_LR[optimizer], **given})


def resolve_runtime(args: argparse.Namespace) -> Runtime:
    """Device and thread count; ``--device cuda`` without CUDA is an input error."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA device (use --device cpu or auto)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cuda" if args.device == "cuda" else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Runtime(device=device, threads=torch.get_num_threads())


def versions() -> dict[str, str]:
    """Versions recorded in summary files."""
    return {"larsopt": larsopt.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _resume_config(args: argparse.Namespace, state: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig(**state["config"])
    except (KeyError, TypeError):
        raise UsageError("--resume: the checkpoint's settings are not those of this larsopt version") from None
    for name, value in given_options(args).items():
        if value != getattr(config, name):
            raise UsageError(f"--resume: --{name.replace('_', '-')} {value} differs from the checkpoint's "
                             f"{getattr(config, name)}; leave it out to resume with the saved settings")
    return config


def summary(config: RunConfig, dataset: data.Dataset, runtime: Runtime, trainer: Trainer,
            result: RunResult) -> dict[str, Any]:
    """The content of summary.json."""
    best = result.best
    return {
        "completed": not result.interrupted,
        "config": {**asdict(config), "peak_lr": config.peak_lr},
        "epochs_completed": len(result.metrics),
        "final_test_accuracy": result.final_test_accuracy,
        "best_test_accuracy": best.get("test_accuracy"),
        "best_epoch": best.get("epoch"),
        "final_train_loss": result.metrics[-1]["train_loss"] if result.metrics else None,
        "wall_time_s": result.wall_time_s,
        "samples_per_s": result.samples_per_s,
        "steps": trainer.global_step,
        "data": {"name": dataset.name, "train_samples": len(dataset.x_train), "test_samples": len(dataset.x_test),
                 "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes},
        "model_parameters": sum(param.numel() for param in trainer.model.parameters()),
        "device": str(runtime.device),
        "threads": runtime.threads,
        "versions": versions(),
    }


def _write_pictures(folder: Path, config: RunConfig, result: RunResult) -> None:
    title = (f"{config.model} on {config.data}, {config.optimizer.upper()}, batch {config.batch_size}, "
             f"peak lr {config.peak_lr:g}")
    plots.curves(folder / outputs.CURVES, result.metrics, title)
    plots.trust_heatmap(folder / outputs.TRUST, result.trust_names, result.trust_history,
                        f"trust ratio eta*|w|/(|g|+wd*|w|) per layer"
                        f"{'' if config.optimizer == 'lars' else ' (what LARS would apply; SGD ignores it)'}")


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt train``; returns the exit code."""
    runtime = resolve_runtime(args)
    state = None
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: choose one")
        if args.out is None:
            raise UsageError("--resume needs --out FOLDER, the folder of the run to continue")
        folder = Path(args.out)
        if not (folder / outputs.CHECKPOINT).is_file():
            raise UsageError(f"--resume: no {outputs.CHECKPOINT} in {folder}")
        state = outputs.load_checkpoint(folder / outputs.CHECKPOINT)
        config = _resume_config(args, state)
    else:
        config = resolve_config(args)
        folder = Path(args.out) if args.out is not None else outputs.default_run_folder(
            f"{config.data.partition(':')[0]}-{config.model}-{config.optimizer}")
        outputs.check_new_output(folder, args.overwrite, outputs.RUN_FILES)
    plots.require_matplotlib()
    dataset = data.load(config.data)
    trainer = Trainer(config, dataset, runtime)
    if state is not None:
        trainer.load_state_dict(state)
    else:
        outputs.prepare_output(folder, outputs.RUN_FILES)
    # A resumed run drops any rows logged after its checkpoint: they will be recomputed.
    outputs.write_jsonl(folder / outputs.METRICS, trainer.metrics)

    progress = Progress(trainer.total_steps, trainer.global_step, config.epochs, args.quiet)

    def on_epoch(row: dict[str, Any]) -> None:
        outputs.write_jsonl(folder / outputs.METRICS, trainer.metrics)
        progress.epoch(row)

    stop = StopRequest()
    try:
        with stop.installed():
            completed = trainer.run(
                stop,
                on_step=lambda loss, accuracy: progress.step(loss, accuracy, config.batch_size),
                on_epoch=on_epoch,
                on_checkpoint=lambda: outputs.save_checkpoint(folder / outputs.CHECKPOINT, trainer.state_dict()))
    finally:
        progress.close()
    result = trainer.result(interrupted=not completed)
    outputs.write_json(folder / outputs.SUMMARY, summary(config, dataset, runtime, trainer, result))
    if result.metrics:
        _write_pictures(folder, config, result)
    if not completed:
        print(f"stopped at epoch {trainer.epoch + 1}, step {trainer.global_step}/{trainer.total_steps}; "
              f"checkpoint saved. Continue with: larsopt train --out {folder} --resume")
        return INTERRUPTED_EXIT_CODE
    best = result.best
    print(f"test accuracy {result.final_test_accuracy:.4f} (best {best['test_accuracy']:.4f} at epoch "
          f"{best['epoch']}) after {len(result.metrics)} epochs in {result.wall_time_s:.1f} s "
          f"({result.samples_per_s:.0f} samples/s); outputs in {folder}")
    if not math.isfinite(result.metrics[-1]["train_loss"]):
        print("warning: the training loss is not finite (the run diverged): try a lower --lr or more --warmup-epochs")
    return 0
