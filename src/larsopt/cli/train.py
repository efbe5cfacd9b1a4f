"""``larsopt train``: one run, its files, and resuming it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import larsopt
from larsopt.cli import data, distributed, outputs, plots
from larsopt.cli.config import RunConfig, changes_numbers, config_fields
from larsopt.cli.distributed import PARALLEL_MODES, Processes
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
        "processes": {"parallel": trainer.processes.parallel, "world_size": trainer.processes.world_size},
        "telemetry": trainer.telemetry_summary(),
        "versions": versions(),
    }


def _write_pictures(out: outputs.OutputFolder, config: RunConfig, result: RunResult) -> None:
    title = (f"{config.model} on {config.data_kind}, {config.optimizer}, batch {config.batch_size}, "
             f"peak lr {config.peak_lr:g}")
    plots.curves(out.path(outputs.CURVES), result.metrics, title)
    plots.trust_heatmap(out.path(outputs.TRUST), result.trust_names, result.trust_history,
                        f"trust ratio per layer, as {config.optimizer} applied it" if config.optimizer != "sgd" else
                        "trust ratio eta*|w|/(|g|+wd*|w|) per layer (what LARS would apply; SGD ignores it)")


def _save_checkpoint(out: outputs.OutputFolder | None, processes: Processes, trainer: Trainer) -> None:
    """Save a checkpoint (every rank takes part; rank 0 writes checkpoint.pt). Under FSDP the
    shards go into a new folder first, and checkpoint.pt, replaced atomically, names it: a kill at
    any moment leaves a checkpoint.pt whose shards are complete."""
    state = trainer.state_dict()
    if processes.sharded:
        folder = Path(processes.from_main(
            str(outputs.new_sharded_checkpoint(out, trainer.global_step)) if out is not None else None))
        processes.save_sharded(folder, trainer.model, trainer.optimizer)
        state["sharded_checkpoint"] = f"{outputs.SHARDED_CHECKPOINTS}/{folder.name}"
    if out is not None:
        outputs.save_checkpoint(out.path(outputs.CHECKPOINT), state)
        out.commit()
        if processes.sharded:
            outputs.remove_other_sharded_checkpoints(out.folder, folder.name)


def _train(out: outputs.OutputFolder | None, args: argparse.Namespace, config: RunConfig, dataset: data.Dataset,
           trainer: Trainer, processes: Processes) -> int:
    """Train; rank 0 (the only one with ``out``) writes and prints."""
    if out is not None:
        # A resumed run drops any rows logged after its checkpoint: they will be recomputed.
        outputs.write_jsonl(out.path(outputs.METRICS), trainer.metrics)
    board = None
    if out is not None and config.tensorboard is not None:
        from larsopt.cli.tensorboard_log import TensorBoardLog

        board = TensorBoardLog(config.tensorboard, trainer.optimizer, trainer.reports_trust, trainer.global_step)
    progress = Progress(trainer.total_steps, trainer.global_step, config.epochs, args.quiet or out is None)

    def on_epoch(row: dict[str, Any]) -> None:
        if out is not None:
            outputs.write_jsonl(out.path(outputs.METRICS), trainer.metrics)
        if board is not None:
            board.epoch(row)
        progress.epoch(row)

    stop = StopRequest()
    try:
        with stop.installed():
            status = trainer.run(stop, on_step=progress.step, on_epoch=on_epoch,
                                 on_checkpoint=lambda: _save_checkpoint(out, processes, trainer))
    finally:
        progress.close()
        if board is not None:
            board.close()
    result = trainer.result(status)
    if status == STOPPED:
        code = stop.exit_code
    elif status == DIVERGED:
        code = DIVERGED_EXIT_CODE
    else:
        code = 0
    if out is None:
        return code
    folder = out.folder
    outputs.write_json(out.path(outputs.SUMMARY), summary(config, dataset, trainer, result))
    if result.metrics:
        _write_pictures(out, config, result)
    if status == STOPPED:
        print(f"stopped at epoch {trainer.epoch + 1}, step {trainer.global_step}/{trainer.total_steps}; "
              f"checkpoint saved. Continue with: larsopt train --out {folder} --resume")
    elif status == DIVERGED:
        print(f"larsopt: the run diverged: a loss is not finite at epoch {trainer.epoch}; outputs in {folder} "
              "(try a lower --lr or a longer --warmup-epochs)", file=sys.stderr)
    else:
        best = result.best
        print(f"test accuracy {result.final_test_accuracy:.4f} (best {best['test_accuracy']:.4f} at epoch "
              f"{best['epoch']}) after {len(result.metrics)} epochs in {result.wall_time_s:.1f} s "
              f"({result.samples_per_s:.0f} samples/s); outputs in {folder}")
    return code


def _read_run(args: argparse.Namespace, folder: Path | None) -> tuple[dict[str, Any] | None, int | None]:
    """Rank 0's look at the files: the checkpoint to resume (``None`` for a new run) and, when
    its summary says the run completed, the epochs it completed. A new run's ``--out`` is checked."""
    if not args.resume:
        if folder is not None:
            outputs.check_new_output(folder, args.overwrite, outputs.RUN_FILES)
        return None, None
    if args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    if folder is None:
        raise UsageError("--resume needs --out FOLDER, the folder of the run to continue")
    if not (folder / outputs.CHECKPOINT).is_file():
        raise UsageError(f"--resume: no {outputs.CHECKPOINT} in {folder}")
    state = outputs.load_checkpoint(folder / outputs.CHECKPOINT)
    if state.get("diverged"):
        raise UsageError(f"--resume: the run in {folder} diverged (its loss is not finite): nothing to continue; "
                         "start a new run with a lower --lr or a longer --warmup-epochs")
    sharded = state.get("sharded_checkpoint")
    if sharded is not None and not (folder / sharded).is_dir():
        raise UsageError(f"--resume: {folder / outputs.CHECKPOINT} names the sharded checkpoint {sharded}, which "
                         "is missing")
    try:
        written = json.loads((folder / outputs.SUMMARY).read_text())
    except (OSError, ValueError):
        written = None
    completed = written.get("epochs_completed") if isinstance(written, dict) and written.get("completed") is True \
        else None
    return state, completed


def _parallel(args: argparse.Namespace, state: dict[str, Any] | None, processes: Processes,
              folder: Path | None) -> str | None:
    """``--parallel``, or under torchrun the resumed run's mode (else ``ddp``); a sharded
    checkpoint resumes only sharded, a full one only unsharded."""
    saved = (state or {}).get("processes", {})
    saved_parallel = saved.get("parallel")
    if not processes.launched:
        if args.parallel is not None:
            raise UsageError(f"--parallel {args.parallel}: needs the processes torchrun starts (torchrun "
                             "--nproc-per-node N -m larsopt train ...); without torchrun larsopt train runs in one "
                             "process")
        parallel = None
    else:
        parallel = args.parallel or (saved_parallel if saved_parallel in PARALLEL_MODES else "ddp")
    if state is not None and (saved_parallel == "fsdp") != (parallel == "fsdp"):
        if saved_parallel == "fsdp":
            raise UsageError(f"--resume: the run in {folder} was saved sharded (--parallel fsdp on "
                             f"{saved.get('world_size')} processes); resume it under torchrun with --parallel fsdp")
        raise UsageError(f"--parallel fsdp: the run in {folder} has a full checkpoint (saved by "
                         f"{'one process' if saved_parallel is None else '--parallel ddp'}); resume it with "
                         "--parallel ddp or in one process")
    return parallel


def _check_processes(config: RunConfig, processes: Processes) -> None:
    """The global batch splits evenly over the processes, and each process's part into micro-batches."""
    world = processes.world_size
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size}: the global batch must split evenly over the {world} "
                         f"processes; use a multiple of {world}")
    if (config.batch_size // world) % config.accumulate:
        raise UsageError(f"--accumulate {config.accumulate}: must divide each process's batch of "
                         f"{config.batch_size // world} (--batch-size {config.batch_size} over {world} processes)")
    if config.device == "cuda" and processes.launched:
        if processes.local_rank >= torch.cuda.device_count():
            raise UsageError(f"--device cuda: LOCAL_RANK {processes.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node")
        torch.cuda.set_device(processes.local_rank)


def command(args: argparse.Namespace) -> int:
    """Run ``larsopt train`` (under torchrun: this rank's part of it); returns the exit code."""
    processes = distributed.detect()
    with distributed.process_group(processes):
        return _command(args, processes)


def _command(args: argparse.Namespace, processes: Processes) -> int:
    folder = None if args.out is None else Path(args.out)
    read, error = (None, None), None
    if processes.is_main:
        try:
            read = _read_run(args, folder)
        except UsageError as caught:
            error = caught
    state, completed_epochs = processes.from_main(read, error)
    processes = processes.with_parallel(_parallel(args, state, processes, folder))
    error = None
    try:
        if state is not None:
            config = _resume_config(args, state)
        else:
            config = resolve(RunConfig(**given_options(args, "train")))
        _check_processes(config, processes)
        torch.set_num_threads(config.threads)
        plots.require_matplotlib()
        if config.tensorboard is not None and processes.is_main:
            from larsopt.cli import tensorboard_log

            tensorboard_log.require(config.tensorboard)
        dataset = data.load(config.data, config.image_size)
    except UsageError as caught:
        error = caught
    processes.agree(error)
    devices = processes.gather(config.device)
    if len(set(devices)) > 1:
        listed = ", ".join(f"rank {rank}: {device}" for rank, device in enumerate(devices))
        raise UsageError(f"--device {args.device or 'auto'}: the processes would train on different devices "
                         f"({listed}); every process must see the same kind (pass --device cpu, or start every "
                         "process where a GPU is)")
    if processes.is_main:
        if state is None:
            print_warnings(config)
        else:
            saved = state.get("processes", {})
            if saved.get("world_size", 1) != processes.world_size:
                print(f"larsopt: warning: --resume: the run was saved by {saved.get('world_size', 1)} process(es) "
                      f"and continues on {processes.world_size}: the same training, its float sums in another "
                      "order (the last digits differ from an uninterrupted run)", file=sys.stderr)
    trainer = Trainer(config, dataset, processes)
    if state is not None:
        sharded = state.get("sharded_checkpoint")
        trainer.load_state_dict(state, None if sharded is None else folder / sharded)
        if trainer.done and completed_epochs == config.epochs:
            if processes.is_main:
                print(f"the run in {folder} is complete ({config.epochs} epochs); nothing to do "
                      "(pass --epochs N to train it further)")
            return 0
    label = f"{config.data_kind}-{config.model.replace(':', '.')}-{config.optimizer}"
    with contextlib.ExitStack() as stack:
        out, error = None, None
        if processes.is_main:
            try:
                out = stack.enter_context(outputs.claim(folder, label=label, files=outputs.RUN_OUTPUTS,
                                                        resume=args.resume, overwrite=args.overwrite))
            except UsageError as caught:
                error = caught
        processes.from_main(None, error)
        try:
            return _train(out, args, config, dataset, trainer, processes)
        except OSError as error:
            if out is None:
                raise
            kept = "" if out.staged else (f"; the last checkpoint is kept: continue with larsopt train --out "
                                          f"{out.folder} --resume once it can be written")
            raise OutputError(f"cannot write into {out.folder} ({error.strerror or type(error).__name__}){kept}") \
                from None
