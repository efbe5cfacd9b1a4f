"""Command-line options of ``larsopt train`` and ``larsopt compare``, and their defaults.

Options are parsed with default ``None`` and the defaults filled in afterwards, so the program
knows which options the user typed (``--resume`` refuses a typed option that contradicts the
checkpoint).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from larsopt.cli.data import DATA_HELP
from larsopt.cli.errors import UsageError
from larsopt.cli.models import MODELS
from larsopt.cli.training import EXCLUDES, OPTIMIZERS, PRECISIONS, SCHEDULES

# The default recipe: MLPerf's LARS recipe for ResNet-50 below batch 16K (peak lr 10, eta 0.001,
# 5 warm-up epochs then power-2 polynomial decay, label smoothing 0.1, no trust ratio or weight
# decay on norm layers and biases) with the paper's weight decay 5e-4, on a batch of 512, a third
# of the 1437 digits training images. Checked on seeds 0-3: test accuracy 0.981-0.983.
DEFAULTS: dict[str, Any] = {
    "data": "digits",
    "model": "mlp",
    "optimizer": "lars",
    "batch_size": 512,
    "epochs": 40,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "eta": 0.001,
    "warmup_epochs": 5.0,
    "schedule": "poly",
    "exclude": "norm_and_bias",
    "label_smoothing": 0.1,
    "seed": 0,
    "precision": "fp32",
    "checkpoint_every": 1,
}
# --lr depends on the optimizer: LARS takes the peak rate itself; SGD the rate for batch 256,
# scaled linearly to the batch (Goyal et al. 2017).
DEFAULT_LR = {"lars": 10.0, "sgd": 0.1}

COMPARE_DEFAULTS: dict[str, Any] = {
    "batch_sizes": "64,128,256,512,1437",
    "epochs": 30,
    "seeds": 3,
}

TRAIN_EXAMPLES = """examples:
  larsopt train                                   # digits, MLP, LARS, batch 512: >= 0.95 in seconds
  larsopt train --model resnet --epochs 30        # a small ResNet with batch norm
  larsopt train --optimizer sgd --batch-size 64   # SGD, lr 0.1 * 64 / 256
  larsopt train --data cifar10:~/data/cifar-10-batches-py --model resnet --batch-size 1024 --device auto
  larsopt train --data npz:my.npz --out runs/mine # x_train, y_train, x_test, y_test arrays
  larsopt train --out runs/mine --resume          # continue after Ctrl-C or a crash, bit for bit
"""

COMPARE_EXAMPLES = """examples:
  larsopt compare                                  # digits, MLP, 30 epochs, batch 64..1437
  larsopt compare --data synthetic:5000 --batch-sizes 32,256,2048 --epochs 10 --out runs/synthetic
"""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), raised as
    :class:`UsageError` so that ``main`` prints them and returns 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


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
nonnegative_int = _number(int, lambda value: value >= 0, "an integer >= 0")
nonnegative_float = _number(float, lambda value: value >= 0 and value != float("inf"), "a finite number >= 0")
unit_interval = _number(float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def batch_size_list(text: str) -> list[int]:
    """``"32,128,512"`` -> ``[32, 128, 512]`` (each > 0)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got {text!r}")
    return sizes


def _shown(name: str) -> str:
    return f" (default: {DEFAULTS[name]})"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and model")
    group.add_argument("--data", help=f"{DATA_HELP}{_shown('data')}")
    group.add_argument("--model", choices=tuple(MODELS), help=f"model{_shown('model')}")


def _add_optimizer_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer{_shown('optimizer')}")
    group.add_argument("--batch-size", type=positive_int, help=f"{_shown('batch_size')[1:]}")
    group.add_argument("--epochs", type=positive_int, help=f"{_shown('epochs')[1:]}")
    group.add_argument("--lr", type=nonnegative_float,
                       help=f"LARS: peak learning rate (default: {DEFAULT_LR['lars']}); SGD: learning rate for "
                            f"batch 256, scaled linearly to the batch size (default: {DEFAULT_LR['sgd']})")
    group.add_argument("--momentum", type=unit_interval, help=f"{_shown('momentum')[1:]}")
    group.add_argument("--weight-decay", type=nonnegative_float, help=f"{_shown('weight_decay')[1:]}")
    group.add_argument("--eta", type=nonnegative_float, help=f"LARS trust coefficient{_shown('eta')}")


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("schedule and regularisation")
    group.add_argument("--warmup-epochs", type=nonnegative_float,
                       help=f"linear warm-up length{_shown('warmup_epochs')}")
    group.add_argument("--schedule", choices=SCHEDULES,
                       help=f"after warm-up: poly = (1 - t)^2 decay (MLPerf), cosine, constant{_shown('schedule')}")
    group.add_argument("--exclude", choices=EXCLUDES,
                       help="parameters without trust ratio (larsopt.param_groups presets): norm_and_bias = "
                            "norm layers and biases, no weight decay either (MLPerf){}".format(_shown("exclude")))
    group.add_argument("--label-smoothing", type=unit_interval, help=f"{_shown('label_smoothing')[1:]}")
    group.add_argument("--seed", type=nonnegative_int, help=f"model initialisation and data order{_shown('seed')}")


def _add_execution_options(parser: argparse.ArgumentParser, resumable: bool) -> None:
    group = parser.add_argument_group("execution and output")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto = cuda if available (default: auto)")
    group.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--precision", choices=PRECISIONS,
                       help="bf16/fp16 run the model under torch.autocast (fp16 adds a GradScaler)"
                            f"{_shown('precision')}")
    group.add_argument("--out", help="output folder (default: a new folder under runs/)")
    group.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    group.add_argument("--quiet", action="store_true", help="no progress output, only the final line")
    if resumable:
        group.add_argument("--checkpoint-every", type=positive_int,
                           help=f"epochs between checkpoints{_shown('checkpoint_every')}")
        group.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its checkpoint.pt, with its settings")


def build_parser() -> argparse.ArgumentParser:
    """The ``larsopt`` parser with its ``train``, ``compare`` and ``bench`` subcommands."""
    parser = OneLineArgumentParser(
        prog="larsopt", description="LARS (layer-wise adaptive rate scaling) for PyTorch: train, compare, bench.")
    from larsopt import __version__

    parser.add_argument("--version", action="version", version=f"larsopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{train,compare,bench}",
                                     parser_class=OneLineArgumentParser)

    train = commands.add_parser(
        "train", help="train a model with a large batch (default: digits, MLP, LARS) and plot it",
        description="Train a model, write metrics.jsonl, summary.json, curves.png, trust.png and checkpoint.pt "
                    "into --out.", epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_options(train)
    _add_optimizer_options(train)
    _add_recipe_options(train)
    _add_execution_options(train, resumable=True)

    compare = commands.add_parser(
        "compare", help="LARS against SGD (linear scaling + warm-up) over several batch sizes",
        description="Train the same model with LARS and with SGD (Goyal et al. 2017: lr 0.1 * batch / 256, "
                    "linear warm-up) at several batch sizes for the same number of epochs, three seeds each "
                    "(--seed and the two after it); print a table, write compare.json and compare.png into --out.",
        epilog=COMPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_options(compare)
    runs = compare.add_argument_group("runs")
    runs.add_argument("--batch-sizes", type=batch_size_list,
                      help=f"comma-separated (default: {COMPARE_DEFAULTS['batch_sizes']})")
    runs.add_argument("--epochs", type=positive_int, help=f"per run (default: {COMPARE_DEFAULTS['epochs']})")
    _add_recipe_options(compare)
    _add_execution_options(compare, resumable=False)

    commands.add_parser("bench", help="optimizer step benchmarks (larsopt.bench; options: larsopt bench --help)",
                        add_help=False)
    return parser
