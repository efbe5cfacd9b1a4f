"""``larsopt train``: one run, its files, and resuming it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import larsopt
from larsopt.cli import data, outputs, plots
from larsopt.cli.config import RunConfig, changes_numbers, config_fields
from larsopt.cli.errors import DIVERGED_EXIT_CODE, OutputError, UsageError
from larsopt.cli.progress import Progress
from larsopt.cli.training import COMPLETED, DIVERGED, STOPPED, RunResult, StopRequest, Trainer


def given_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The run options the user typed (parsed with default None)."""
    names = {spec.name for spec in config_fields(command)}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an input error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA device (use --device cpu or auto)")
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve(config: RunConfig) -> RunConfig:
    """``config`` with its derived defaults filled in (see :meth:`RunConfig.resolved`) and checked."""
    resolved = config.resolved(device=resolve_device(config.device), threads=config.threads or torch.get_num_threads())
    resolved.check()
    return resolved


def print_warnings(config: RunConfig) -> None:
    for warning in config.warnings():
        print(f"larsopt: warning: {warning}", file=sys.stderr)


def versions() -> dict[str, str]:
    """Versions recorded in summary files."""
    return {"larsopt": larsopt.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _resume_config(args: argparse.Namespace, state: dict[str, Any]) -> RunConfig:
    """The saved settings, with the typed options that may change on resume: those that do not
    change the numbers (``--checkpoint-every``), and ``--epochs`` (not below the epochs done)."""
    if not isinstance(state.get("config"), dict):
        raise UsageError("--resume: the checkpoint holds no settings")
    saved = resolve(RunConfig.from_saved(state["config"]))
    given = given_options(args, "train")
    typed = resolve(dataclasses.replace(saved, **given))
    changes = {}
    for name in given:
        value, kept = getattr(typed, name), getattr(saved, name)
        if value == kept:
            continue
        if name == "epochs":
            done = len(state.get("metrics", []))
            if value < done:
                raise UsageError(f"--resume: --epochs {value} is fewer than the {done} epochs this run has done")
        elif changes_numbers(name):
            raise UsageError(f"--resume: --{name.replace('_', '-')} {value} differs from the checkpoint's "
                             f"{kept}; leave it out to resume with the saved settings")
        changes[name] = value
    return resolve(dataclasses.replace(saved, **changes))


def _summary_complete(path: Path, epochs: int) -> bool:
    """Whether ``path`` is the summary of a run completed after ``epochs`` epochs (a run whose
    summary could not be written, a full disk say, gets it written by ``--resume``)."""
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and written.get("completed") is True and written.get("epochs_completed") == epochs


def summary(config: RunConfig, dataset: data.Dataset, trainer: Trainer, result: RunResult) -> dict[str, Any]:
    """The content of summary.json."""
    best = result.best
    return {
        "completed": result.status == COMPLETED,
        "status": result.status,
        "config": {**dataclasses.asdict(config), "peak_lr": config.peak_lr},
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
        "device": config.device,
        "threads": config.threads,
        "versions": versions(),
    }


def _write_pictures(out: outputs.OutputFolder, config: RunConfig, result: RunResult) -> None:
    title = (f"{config.model} on {config.data_kind}, {config.optimizer.upper()}, batch {config.batch_size}, "
             f"peak lr {config.peak_lr:g}")
    plots.curves(out.path(outputs.CURVES), result.metrics, title)
    plots.trust_heatmap(out.path(outputs.TRUST), result.trust_names, result.trust_history,
                        f"trust ratio eta*|w|/(|g|+wd*|w|) per layer"
                        f"{'' if config.optimizer == 'lars' else ' (what LARS would apply; SGD ignores it)'}")


def _train(out: outputs.OutputFolder, args: argparse.Namespace, config: RunConfig, dataset: data.Dataset,
           trainer: Trainer) -> int:
    folder = out.folder
    # A resumed run drops any rows logged after its checkpoint: they will be recomputed.
    outputs.write_jsonl(out.path(outputs.METRICS), trainer.metrics)
    progress = Progress(trainer.total_steps, trainer.global_step, config.epochs, args.quiet)

    def on_epoch(row: dict[str, Any]) -> None:
        outputs.write_jsonl(out.path(outputs.METRICS), trainer.metrics)
        progress.epoch(row)

    def on_checkpoint() -> None:
        outputs.save_checkpoint(out.path(outputs.CHECKPOINT), trainer.state_dict())
        out.commit()

    stop = StopRequest()
    try:
        with stop.installed():
            status = trainer.run(stop, on_step=progress.step, on_epoch=on_epoch, on_checkpoint=on_checkpoint)
    finally:
        progress.close()
    result = trainer.result(status)
    outputs.write_json(out.path(outputs.SUMMARY), summary(config, dataset, trainer, result))
    if result.metrics:
        _write_pictures(out, config, result)
    if status == STOPPED:
        print(f"stopped at epoch {trainer.epoch + 1}, step {trainer.global_step}/{trainer.total_steps}; "
              f"checkpoint saved. Continue with: larsopt train --out {folder} --resume")
        return stop.exit_code
    if status == DIVERGED:
        print(f"larsopt: the run diverged: a loss is not finite at epoch {trainer.epoch}; outputs in {folder} "
              "(try a lower --lr or a longer --warmup-epochs)", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    best = result.best
    print(f"test accuracy {result.final_test_accuracy:.4f} (best {best['test_accuracy']:.4f} at epoch "
          f"{best['epoch']}) after {len(result.metrics)} epochs in {result.wall_time_s:.1f} s "
          f"({result.samples_per_s:.0f} samples/s); outputs in {folder}")
    return 0


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt train``; returns the exit code."""
    state = None
    folder = None if args.out is None else Path(args.out)
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: choose one")
        if folder is None:
            raise UsageError("--resume needs --out FOLDER, the folder of the run to continue")
        if not (folder / outputs.CHECKPOINT).is_file():
            raise UsageError(f"--resume: no {outputs.CHECKPOINT} in {folder}")
        state = outputs.load_checkpoint(folder / outputs.CHECKPOINT)
        config = _resume_config(args, state)
        if state.get("diverged"):
            raise UsageError(f"--resume: the run in {folder} diverged (its loss is not finite): nothing to continue; "
                             "start a new run with a lower --lr or a longer --warmup-epochs")
    else:
        config = resolve(RunConfig(**given_options(args, "train")))
        print_warnings(config)
        if folder is not None:
            outputs.check_new_output(folder, args.overwrite, outputs.RUN_FILES)
    torch.set_num_threads(config.threads)
    plots.require_matplotlib()
    dataset = data.load(config.data, config.image_size)
    trainer = Trainer(config, dataset)
    if state is not None:
        trainer.load_state_dict(state)
        if trainer.done and _summary_complete(folder / outputs.SUMMARY, config.epochs):
            print(f"the run in {folder} is complete ({config.epochs} epochs); nothing to do "
                  "(pass --epochs N to train it further)")
            return 0
    label = f"{config.data_kind}-{config.model.replace(':', '.')}-{config.optimizer}"
    with outputs.claim(folder, label=label, files=outputs.RUN_FILES, resume=args.resume,
                       overwrite=args.overwrite) as out:
        try:
            return _train(out, args, config, dataset, trainer)
        except OSError as error:
            kept = "" if out.staged else (f"; the last checkpoint is kept: continue with larsopt train --out "
                                          f"{out.folder} --resume once it can be written")
            raise OutputError(f"cannot write into {out.folder} ({error.strerror or type(error).__name__}){kept}") \
                from None
