"""The settings of a run, each declared once.

Every option of ``larsopt train`` and ``larsopt compare`` that reaches a run is a field of
:class:`RunConfig` carrying its default, its help text, its parser and the commands that offer
it; the command line is built from these fields (``larsopt.cli.options``), and a checkpoint saved
before a field existed resumes with that field's default. A new option is one field here plus the
code that uses it.

This module imports no torch, so that ``larsopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from larsopt.cli.errors import UsageError

# larsopt.presets: each peer's LARS with its own signature (larsopt.cli.optimizers maps a run's
# settings onto their arguments).
PRESETS = ("timm", "pytorch_optimizer", "bolts", "larc", "optax", "mlperf", "ssl", "mxnet")
OPTIMIZERS = ("lars", "sgd", *PRESETS)
# The package's own spelling of a preset, accepted as the preset's name.
OPTIMIZER_ALIASES = {"pytorch-optimizer": "pytorch_optimizer"}
# timm and Lightning Bolts adapt only the param groups whose weight decay is not zero.
ADAPT_ONLY_WITH_WEIGHT_DECAY = ("timm", "bolts")
SCHEDULES = ("poly", "cosine", "constant")
EXCLUDES = ("mxnet", "ndim", "norm_and_bias", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BUILTIN_MODELS = ("mlp", "cnn", "resnet")
DATA_HELP = "digits | synthetic[:N] | cifar10:DIR | npz:FILE | imagefolder:DIR"
# Data kinds whose argument is a path: saved absolute, so that --resume works from any folder.
PATH_DATA_KINDS = ("cifar10", "npz", "imagefolder")
# Natural photographs, where random crops and flips are the standard augmentation.
AUGMENTED_DATA_KINDS = ("cifar10", "imagefolder")

# Goyal et al. 2017: SGD's lr is given for a batch of 256 and scaled linearly (lr * batch / 256).
SGD_REFERENCE_BATCH = 256
# --lr depends on the optimizer: LARS and every preset take the peak rate itself (MLPerf's base lr
# below batch 16K; the trust ratio makes one rate fit every batch size); SGD the rate for batch 256.
DEFAULT_LR = {name: 0.1 if name == "sgd" else 10.0 for name in OPTIMIZERS}
# The default warm-up: MLPerf's 5 epochs, but at most a quarter of the run so that a short run
# still decays its lr (40 epochs: 5, 10 epochs: 2.5).
DEFAULT_WARMUP_EPOCHS = 5.0
DEFAULT_WARMUP_FRACTION = 0.25
# MLPerf's exclusion: norm layers and biases get neither trust ratio nor weight decay. The cnn has
# no norm layers, and its biases, stepped by the plain lr of 10, keep it at 0.73-0.81 test accuracy
# after 40 epochs; with the trust ratio on every tensor it reaches 0.95-0.96 (seeds 0-2).
DEFAULT_EXCLUDE = "norm_and_bias"
MODEL_EXCLUDE = {"cnn": "none"}
SEED_LIMIT = 2**64  # torch.manual_seed takes 64-bit seeds

GROUPS = {
    "data": "data and model",
    "optimizer": "optimizer",
    "recipe": "schedule and regularisation",
    "execution": "execution and output",
}


def _number(kind: type, condition: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not condition(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement
    return parse


positive_int = _number(int, lambda value: value > 0, "an integer > 0")
nonnegative_float = _number(float, lambda value: 0 <= value < math.inf, "a finite number >= 0")
unit_interval = _number(float, lambda value: 0 <= value < 1, "a number in [0, 1)")
seed_number = _number(int, lambda value: 0 <= value < SEED_LIMIT, "an integer in 0..2^64-1")
thread_count = _number(int, lambda value: 0 < value <= 4096, "an integer in 1..4096")
# imagefolder holds every decoded image in memory: 1024 x 1024 is already 12 MB of float32 each.
image_side = _number(int, lambda value: 0 < value <= 1024, "an integer in 1..1024")


def optimizer_name(text: str) -> str:
    """An optimizer of :data:`OPTIMIZERS` (``pytorch-optimizer`` spelled either way)."""
    name = OPTIMIZER_ALIASES.get(text, text)
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(OPTIMIZERS)}, got {text!r}")
    return name


def optimizer_list(text: str) -> list[str]:
    """``"lars,timm,sgd"`` -> ``["lars", "timm", "sgd"]`` (each an :func:`optimizer_name`, none twice)."""
    names = [optimizer_name(part.strip()) for part in text.split(",")]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once in {text!r}")
    return names


def choice(*allowed: str) -> Callable[[str], str]:
    """A parser accepting exactly ``allowed`` (argparse's ``choices`` message, but usable on
    saved settings too)."""
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


_INTERVAL = re.compile(r"^\s*(?:(?P<epochs>\d+)|(?P<amount>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[smh]))\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def checkpoint_interval(text: str) -> str:
    """``N`` (epochs, > 0) or a time such as ``30s``, ``10m``, ``1.5h`` (> 0)."""
    match = _INTERVAL.match(str(text))
    if match is None or (match["epochs"] is not None and int(match["epochs"]) == 0) or (
            match["amount"] is not None and float(match["amount"]) == 0):
        raise argparse.ArgumentTypeError(
            f"expected a number of epochs (an integer > 0) or a time like 30s, 10m, 2h, got {text!r}")
    return str(text).strip()


def checkpoint_interval_parts(text: str) -> tuple[int | None, float | None]:
    """``(epochs, None)`` or ``(None, seconds)`` of a :func:`checkpoint_interval`."""
    match = _INTERVAL.match(checkpoint_interval(text))
    assert match is not None
    if match["epochs"] is not None:
        return int(match["epochs"]), None
    return None, float(match["amount"]) * _UNIT_SECONDS[match["unit"]]


_MODEL_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def folder_path(text: str) -> str:
    """A folder path (not empty)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    return str(text)


def model_spec(text: str) -> str:
    """A built-in model name or ``module:callable``."""
    if text in BUILTIN_MODELS or _MODEL_REFERENCE.match(text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(BUILTIN_MODELS)} or module:callable, got {text!r}")


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
           choices: tuple[str, ...] | None = None, group: str,
           commands: tuple[str, ...] = ("train", "compare"), changes_numbers: bool = True,
           default_text: str | None = None, flag: str | None = None, constant: Any = None,
           compare_default: Any = None, absent: Any = dataclasses.MISSING, metavar: str | None = None) -> Any:
    """A :class:`RunConfig` field and how the command line offers it.

    ``parse`` turns the typed text into the value (and validates it, also for saved settings),
    ``choices`` lists the allowed words of a word-valued option;
    ``changes_numbers=False`` marks a setting that ``--resume`` may change; ``flag`` with
    ``constant`` makes a switch (``--no-augment``) that stores ``constant``; ``absent`` is the
    value a checkpoint saved before the field existed ran with, when that is not the default;
    ``metavar`` names the value in ``--help`` (default: the field's name in capitals).
    """
    if choices is not None:
        parse = choice(*choices)
    return field(default=default, metadata={
        "help": help, "parse": parse, "choices": choices, "group": group, "commands": commands, "changes_numbers": changes_numbers,
        "default_text": default_text, "flag": flag, "constant": constant, "compare_default": compare_default,
        "absent": absent, "metavar": metavar})


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers (saved in the checkpoint and the summary).

    Fields left at ``None`` are derived from the others by :meth:`resolved`; a saved config is
    always resolved.
    """

    data: str = option("digits", DATA_HELP, group="data")
    image_size: int = option(32, "imagefolder: side in pixels the images are resized and centre-cropped to",
                             parse=image_side, group="data")
    model: str = option("mlp", f"{' | '.join(BUILTIN_MODELS)} | module:callable (a function of (input_shape, "
                        "num_classes) returning an nn.Module)", parse=model_spec, group="data")
    augment: bool | None = option(
        None, "no random crops and flips of the training images (on by default for cifar10 and imagefolder, "
        "off otherwise)", group="data", flag="--no-augment", constant=False, default_text="", absent=False)
    optimizer: str = option(
        "lars", f"lars (larsopt.LARS), sgd (torch.optim.SGD), or a peer's LARS as larsopt.presets has it: "
        f"{', '.join(PRESETS)} (the flags below mapped onto its own arguments: docs/cli.md)",
        parse=optimizer_name, group="optimizer", commands=("train",))
    batch_size: int = option(512, "samples per optimizer step", parse=positive_int, group="optimizer",
                             commands=("train",))
    accumulate: int = option(1, "gradient accumulation: each step sums the gradients of N micro-batches of "
                             "batch-size / N samples", parse=positive_int, group="optimizer", commands=("train",))
    epochs: int = option(40, "epochs to train", parse=positive_int, group="optimizer", compare_default=30)
    lr: float | None = option(
        None, f"LARS and the presets: peak learning rate (default: {DEFAULT_LR['lars']:g}); SGD: learning rate "
        f"for batch {SGD_REFERENCE_BATCH}, scaled linearly to the batch size (default: {DEFAULT_LR['sgd']:g})",
        parse=nonnegative_float, group="optimizer", commands=("train",), default_text="")
    momentum: float = option(0.9, "momentum", parse=unit_interval, group="optimizer", commands=("train",))
    weight_decay: float = option(5e-4, "weight decay", parse=nonnegative_float, group="optimizer",
                                 commands=("train",))
    eta: float = option(0.001, "LARS trust coefficient (the presets' trust_coeff, trust_coefficient, eeta or eta)",
                        parse=nonnegative_float, group="optimizer",
                        commands=("train",))
    warmup_epochs: float | None = option(
        None, "linear warm-up length in epochs (default: 5, at most a quarter of the run)",
        parse=nonnegative_float, group="recipe", default_text="")
    schedule: str = option("poly", "after warm-up: poly = (1 - t)^2 decay (MLPerf), cosine, constant",
                           choices=SCHEDULES, group="recipe")
    exclude: str | None = option(
        None, "parameters without trust ratio (larsopt.param_groups presets): norm_and_bias = norm layers and "
        "biases, no weight decay either (MLPerf); none = every tensor gets both", choices=EXCLUDES, group="recipe",
        default_text=f"{DEFAULT_EXCLUDE}; {', '.join(f'{model}: {value}' for model, value in MODEL_EXCLUDE.items())}")
    label_smoothing: float = option(0.1, "label smoothing", parse=unit_interval, group="recipe")
    seed: int = option(0, "model initialisation, data order and augmentation", parse=seed_number, group="recipe")
    precision: str = option("fp32", "bf16/fp16 run the model under torch.autocast (fp16 adds a GradScaler)",
                            choices=PRECISIONS, group="execution")
    device: str = option("auto", "auto = cuda if available", choices=DEVICES, group="execution")
    threads: int | None = option(None, "CPU threads for torch; the results depend on it, so --resume reuses it",
                                 parse=thread_count, group="execution", default_text="torch's choice")
    checkpoint_every: str = option("1", "epochs (N) or time (30s, 10m, 2h) between checkpoints; a checkpoint "
                                   "is also saved at the end, on Ctrl-C and on SIGTERM",
                                   parse=checkpoint_interval, group="execution", commands=("train",),
                                   changes_numbers=False)
    tensorboard: str | None = option(
        None, "also write TensorBoard event files into DIR: per epoch the loss, accuracy and lr, and for LARS "
        "optimizers each layer's telemetry over the epoch (trust ratio, step size, fallback and clip counts) "
        "and a histogram of the ratios (needs pip install \"larsopt[tensorboard]\")", parse=folder_path,
        group="execution", commands=("train",), changes_numbers=False, default_text="", metavar="DIR")

    @property
    def peak_lr(self) -> float:
        """The learning rate reached after warm-up: ``lr`` for LARS; for SGD ``lr`` is the rate
        for a batch of 256 and is scaled linearly to the batch size (Goyal et al. 2017)."""
        assert self.lr is not None, "resolve the config first"
        if self.optimizer == "sgd":
            return self.lr * self.batch_size / SGD_REFERENCE_BATCH
        return self.lr

    @property
    def data_kind(self) -> str:
        return self.data.partition(":")[0]

    def resolved(self, *, device: str, threads: int) -> RunConfig:
        """Derived defaults filled in: ``lr`` from the optimizer, the warm-up from the run length,
        the exclusion from the model,
        augmentation from the data, the data path and the TensorBoard folder made absolute, ``device`` (``auto`` resolved by
        the caller) and ``threads`` (torch's choice when not given)."""
        kind, _, argument = self.data.partition(":")
        data = f"{kind}:{os.path.abspath(Path(argument).expanduser())}" if kind in PATH_DATA_KINDS and argument \
            else self.data
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = min(DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_FRACTION * self.epochs)
        exclude = MODEL_EXCLUDE.get(self.model, DEFAULT_EXCLUDE) if self.exclude is None else self.exclude
        tensorboard = None if self.tensorboard is None else os.path.abspath(Path(self.tensorboard).expanduser())
        return dataclasses.replace(
            self, data=data, tensorboard=tensorboard, device=device, threads=threads, warmup_epochs=warmup, exclude=exclude,
            lr=DEFAULT_LR[self.optimizer] if self.lr is None else self.lr,
            augment=kind in AUGMENTED_DATA_KINDS if self.augment is None else self.augment)

    def check(self) -> None:
        """Refuse combinations no single option's parser can see."""
        if self.batch_size % self.accumulate:
            raise UsageError(f"--accumulate {self.accumulate}: must divide --batch-size {self.batch_size} "
                             "(micro-batches of batch-size / accumulate samples)")
        if self.image_size != RunConfig.image_size and self.data_kind != "imagefolder":
            raise UsageError(f"--image-size {self.image_size}: only imagefolder data is resized; "
                             f"--data {self.data} keeps its size")

    def warnings(self) -> list[str]:
        """What a user should hear about settings that run but are likely a mistake."""
        warnings = []
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            warnings.append(f"--warmup-epochs {self.warmup_epochs:g} is not shorter than the run (--epochs "
                            f"{self.epochs}): the lr rises for the whole run and never decays")
        if self.optimizer in ADAPT_ONLY_WITH_WEIGHT_DECAY and self.weight_decay == 0:
            warnings.append(f"--optimizer {self.optimizer} with --weight-decay 0: {self.optimizer} adapts only the "
                            "param groups with weight decay, so no tensor gets a trust ratio (plain momentum SGD)")
        return warnings

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunConfig:
        """The config saved in a checkpoint: each value checked by its option's parser; a field
        the checkpoint lacks (saved by an older larsopt) takes its default."""
        known = {spec.name: spec for spec in fields(cls)}
        unknown = sorted(set(saved) - set(known))
        if unknown:
            raise UsageError(f"--resume: the checkpoint has settings this larsopt version does not know "
                             f"({', '.join(unknown)}); resume it with the larsopt that wrote it")
        values = {}
        for name, spec in known.items():
            if name not in saved:
                if spec.metadata["absent"] is not dataclasses.MISSING:
                    values[name] = spec.metadata["absent"]
                continue
            value, parse = saved[name], spec.metadata["parse"]
            if value is not None and parse is not None:
                try:
                    value = parse(str(value))
                except argparse.ArgumentTypeError as error:
                    raise UsageError(f"--resume: the checkpoint's {name} is not valid ({error})") from None
            values[name] = value
        return cls(**values)


def config_fields(command: str) -> list[dataclasses.Field[Any]]:
    """The :class:`RunConfig` fields ``command`` offers as options, in declaration order."""
    return [spec for spec in fields(RunConfig) if command in spec.metadata["commands"]]


def flag_of(spec: dataclasses.Field[Any]) -> str:
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


def compare_defaults() -> dict[str, Any]:
    """The defaults ``larsopt compare`` has of its own (a shorter run)."""
    return {spec.name: spec.metadata["compare_default"] for spec in fields(RunConfig)
            if spec.metadata["compare_default"] is not None}


def changes_numbers(name: str) -> bool:
    """Whether the setting ``name`` changes a run's numbers (``--resume`` refuses to change it)."""
    return next(spec for spec in fields(RunConfig) if spec.name == name).metadata["changes_numbers"]
