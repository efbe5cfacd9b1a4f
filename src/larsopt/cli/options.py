"""The ``larsopt`` argument parser, built from the :class:`~larsopt.cli.config.RunConfig` fields.

Run options are parsed with default ``None`` and the defaults filled in afterwards, so the program
knows which options the user typed (``--resume`` refuses a typed option that contradicts the
checkpoint). Option names must be typed in full: an abbreviation that happens to match today
could mean another option tomorrow.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any, NoReturn

from larsopt.cli.config import GROUPS, OPTIMIZERS, config_fields, flag_of, optimizer_list
from larsopt.cli.errors import UsageError

COMPARE_BATCH_SIZES = (64, 128, 256, 512, 1437)
COMPARE_OPTIMIZERS = ("lars", "sgd")
COMPARE_SEEDS = 3

TRAIN_EXAMPLES = """examples:
  larsopt train                                   # digits, MLP, LARS, batch 512: 0.98 in seconds
  larsopt train --model resnet --epochs 30        # a small ResNet with batch norm
  larsopt train --optimizer sgd --batch-size 64   # SGD, lr 0.1 * 64 / 256
  larsopt train --optimizer optax                 # optax.lars's formula (larsopt.presets.optax), same recipe
  larsopt train --data cifar10:~/data/cifar-10-batches-py --model resnet --batch-size 1024 --accumulate 4
  larsopt train --data imagefolder:~/photos --image-size 64 --model mymodels:make_net
  larsopt train --data npz:my.npz --out runs/mine # x_train, y_train, x_test, y_test arrays
  larsopt train --out runs/mine --resume          # continue after Ctrl-C, SIGTERM or a crash, bit for bit
  larsopt train --out runs/mine --resume --epochs 60   # train a finished run further
  torchrun --nproc-per-node 2 -m larsopt train --batch-size 512 --out runs/two   # 256 samples per process
"""

COMPARE_EXAMPLES = """examples:
  larsopt compare                                  # digits, MLP, 30 epochs, batch 64..1437
  larsopt compare --optimizers lars,timm,optax,mlperf,sgd --batch-sizes 64,256,1437   # the LARS families
  larsopt compare --data synthetic:5000 --batch-sizes 32,256,2048 --epochs 10 --out runs/synthetic
  larsopt compare --out runs/synthetic --resume    # run what an interrupted compare left
"""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), raised as
    :class:`UsageError` so that ``main`` prints them and returns 2; unknown options get a
    "did you mean" from the options of the (sub)command they were given to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise UsageError(self._unknown_message(parsed, unknown))
        return parsed

    def _unknown_message(self, parsed: argparse.Namespace, unknown: list[str]) -> str:
        parser = self._subcommand(getattr(parsed, "command", None)) or self
        options = [text.split("=", 1)[0] for text in unknown if text.startswith("-")]
        if not options:
            return f"unexpected argument {unknown[0]!r} (see {parser.prog} --help)"
        known = [name for action in parser._actions for name in action.option_strings]
        guess = difflib.get_close_matches(options[0], known, n=1, cutoff=0.7)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        return f"unknown option {options[0]}{hint} (see {parser.prog} --help)"

    def _subcommand(self, name: str | None) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None


def batch_size_list(text: str) -> list[int]:
    """``"32,128,512"`` -> ``[32, 128, 512]`` (each > 0, none twice)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got {text!r}")
    repeated = sorted({size for size in sizes if sizes.count(size) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, repeated))} given more than once in {text!r}")
    return sizes


def _help(spec: Any, command: str) -> str:
    metadata = spec.metadata
    default = metadata["compare_default"] if command == "compare" and metadata["compare_default"] is not None \
        else spec.default
    shown = default if metadata["default_text"] is None else metadata["default_text"]
    return f"{metadata['help']} (default: {shown})" if shown != "" else metadata["help"]


def _add_config_options(parser: argparse.ArgumentParser, command: str,
                        groups: dict[str, argparse._ArgumentGroup]) -> None:
    for spec in config_fields(command):
        metadata = spec.metadata
        group = groups[metadata["group"]]
        if metadata["constant"] is not None:
            group.add_argument(flag_of(spec), dest=spec.name, action="store_const", const=metadata["constant"],
                               default=None, help=_help(spec, command))
        elif metadata["choices"] is not None:
            group.add_argument(flag_of(spec), dest=spec.name, choices=metadata["choices"], default=None,
                               help=_help(spec, command))
        else:
            group.add_argument(flag_of(spec), dest=spec.name, type=metadata["parse"], default=None,
                               metavar=metadata["metavar"] or spec.name.upper(), help=_help(spec, command))


def _add_command(commands: Any, name: str, epilog: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 **kwargs)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    if name == "compare":
        groups["runs"] = parser.add_argument_group("runs")
        groups["runs"].add_argument(
            "--batch-sizes", type=batch_size_list, metavar="SIZES",
            help=f"comma-separated (default: {','.join(map(str, COMPARE_BATCH_SIZES))})")
        groups["runs"].add_argument(
            "--optimizers", type=optimizer_list, metavar="NAMES",
            help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: {','.join(COMPARE_OPTIMIZERS)})")
    _add_config_options(parser, name, groups)
    execution = groups["execution"]
    execution.add_argument("--out", help="output folder (default: a new folder under runs/)")
    execution.add_argument("--overwrite", action="store_true",
                           help="replace the run in a non-empty --out folder (its files are replaced once the "
                                "new run has written its own)")
    if name == "train":
        execution.add_argument(
            "--parallel", choices=("ddp", "fsdp"),
            help="under torchrun: ddp (each process holds the whole model; gradients all-reduced) or fsdp (params, "
                 "gradients and optimizer state sharded over the processes; checkpoints sharded) (default: ddp, or "
                 "the resumed run's)")
    execution.add_argument("--quiet", action="store_true", help="no progress output, only the final line")
    execution.add_argument("--resume", action="store_true",
                           help="continue the run in --out with its saved settings" if name == "train" else
                           "run only what the compare in --out has not finished, with its saved settings")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``larsopt`` parser with its ``train``, ``compare`` and ``bench`` subcommands."""
    parser = OneLineArgumentParser(
        prog="larsopt", description="LARS (layer-wise adaptive rate scaling) for PyTorch: train, compare, bench.")
    from larsopt import __version__

    parser.add_argument("--version", action="version", version=f"larsopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{train,compare,bench}",
                                     parser_class=OneLineArgumentParser)
    _add_command(commands, "train", TRAIN_EXAMPLES,
                 help="train a model with a large batch (default: digits, MLP, LARS) and plot it",
                 description="Train a model, write metrics.jsonl, summary.json, curves.png, trust.png and "
                             "checkpoint.pt into --out.")
    _add_command(commands, "compare", COMPARE_EXAMPLES,
                 help="LARS against SGD (linear scaling + warm-up), or the LARS families, over several batch sizes",
                 description="Train the same model with each of --optimizers (default: LARS and SGD, Goyal et al. "
                             "2017: lr 0.1 * batch / 256, linear warm-up) at several batch sizes for the same number "
                             f"of epochs, {COMPARE_SEEDS} seeds each (--seed and the ones after it); print a table, "
                             "write compare.json and compare.png into --out.")
    commands.add_parser("bench", help="optimizer step benchmarks (larsopt.bench; options: larsopt bench --help)",
                        add_help=False)
    return parser
