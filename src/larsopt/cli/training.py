"""The training loop behind ``larsopt train`` and ``larsopt compare``.

Reproducibility and resumption: the model is initialised from ``torch.manual_seed(seed)`` and
the data order comes from its own generator seeded with ``seed``. A checkpoint holds everything
the rest of the run depends on (model, optimizer, scheduler, grad scaler, both random
generators, the position inside the epoch with that epoch's order, the running sums and the
logged history), so a run resumed from any checkpoint ends with exactly the weights and metrics
of a run that was never stopped (timing fields aside).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import larsopt
from larsopt import functional
from larsopt.cli import models
from larsopt.cli.data import Dataset
from larsopt.cli.errors import UsageError

OPTIMIZERS = ("lars", "sgd")
SCHEDULES = ("poly", "cosine", "constant")
EXCLUDES = ("mxnet", "ndim", "norm_and_bias", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Goyal et al. 2017: lr = 0.1 * batch / 256 (the linear scaling rule).
SGD_REFERENCE_BATCH = 256
_EVAL_BATCH = 1024
TRUST_EPSILON = 1e-8
_CHECKPOINT_FORMAT = 1


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (saved in the checkpoint and summary)."""

    data: str
    model: str
    optimizer: str
    batch_size: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    eta: float
    warmup_epochs: float
    schedule: str
    exclude: str
    label_smoothing: float
    seed: int
    precision: str
    checkpoint_every: int

    @property
    def peak_lr(self) -> float:
        """The learning rate reached after warm-up: ``lr`` for LARS; for SGD ``lr`` is the rate
        for a batch of 256 and is scaled linearly to the batch size (Goyal et al. 2017)."""
        if self.optimizer == "sgd":
            return self.lr * self.batch_size / SGD_REFERENCE_BATCH
        return self.lr


@dataclass
class Runtime:
    """How a run is executed, without effect on its numbers on a given machine."""

    device: torch.device
    threads: int


@dataclass
class RunResult:
    """What a finished (or interrupted) run reports."""

    metrics: list[dict[str, Any]]
    trust_names: list[str]
    trust_history: list[list[float]]
    wall_time_s: float
    samples_per_s: float
    interrupted: bool

    @property
    def final_test_accuracy(self) -> float:
        return self.metrics[-1]["test_accuracy"] if self.metrics else float("nan")

    @property
    def best(self) -> dict[str, Any]:
        """The metrics row with the highest test accuracy (first one on ties)."""
        return max(self.metrics, key=lambda row: row["test_accuracy"]) if self.metrics else {}


class WarmupThenDecay:
    """LR factor for ``LambdaLR``: linear warm-up from ``1 / warmup_steps`` to 1, then
    ``poly`` (1 - progress)^2 (MLPerf's power-2 polynomial decay), ``cosine`` or ``constant``.

    A callable object rather than a lambda so that ``LambdaLR.state_dict`` records it.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "poly":
            return (1.0 - progress) ** 2
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class StopRequest:
    """Ctrl-C (SIGINT) sets :attr:`requested`; the loop saves a checkpoint at the next step
    boundary and stops. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch SIGINT while the block runs (only possible in the main thread; elsewhere Ctrl-C
        keeps its default meaning)."""
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_time_s: float = 0.0
    trust_sum: list[float] = field(default_factory=list)
    trust_steps: int = 0


def _trust_layers(optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor, float]]:
    """(name, param, weight decay) of every tensor that gets a LARS trust ratio."""
    return [(name, param, group["weight_decay"])
            for group in optimizer.param_groups if group.get("lars", True)
            for name, param in zip(group["param_names"], group["params"])]


@torch.no_grad()
def trust_ratios(layers: list[tuple[str, Tensor, float]], eta: float, grad_scale: float) -> list[float]:
    """LARS trust ratio ``eta * |w| / (|g| + wd * |w| + eps)`` per layer (1 where |w| or |g| is 0
    or not finite, as the optimizer does), from gradients divided by ``grad_scale`` (AMP).

    For SGD runs this is the ratio LARS would apply; SGD itself does not use it. The ratios are
    stacked and read back once, so on a GPU logging costs one synchronisation per step.
    """
    if not layers:
        return []
    ratios = [
        functional.trust_ratio(
            torch.linalg.vector_norm(param, dtype=torch.float32),
            param.grad / grad_scale if param.grad is not None else torch.zeros_like(param),
            param,
            weight_decay=decay,
            eta=eta,
            epsilon=TRUST_EPSILON,
            trust_norm="sum",
        )
        for _, param, decay in layers
    ]
    return torch.stack(ratios).tolist()


class Trainer:
    """One run: model, optimizer, schedule, data order, and its logged history."""

    def __init__(self, config: RunConfig, dataset: Dataset, runtime: Runtime) -> None:
        self.config = config
        self.device = runtime.device
        torch.manual_seed(config.seed)
        self.model = models.build(config.model, dataset.input_shape, dataset.num_classes).to(self.device)
        self.x_train, self.y_train = dataset.x_train.to(self.device), dataset.y_train.to(self.device)
        self.x_test, self.y_test = dataset.x_test.to(self.device), dataset.y_test.to(self.device)
        self.steps_per_epoch = math.ceil(len(self.x_train) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = self._build_optimizer()
        warmup_steps = min(self.total_steps, max(0, round(config.warmup_epochs * self.steps_per_epoch)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupThenDecay(config.schedule, warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.data_order = torch.Generator().manual_seed(config.seed)
        self.trust_layers = _trust_layers(self.optimizer)
        self.epoch = 0
        self.batch = 0
        self.order: Tensor | None = None
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.totals = _EpochTotals()
        self.metrics: list[dict[str, Any]] = []
        self.trust_history: list[list[float]] = []
        self.elapsed_s = 0.0

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        exclude = None if config.exclude == "none" else config.exclude
        groups = larsopt.param_groups(self.model, weight_decay=config.weight_decay, exclude=exclude)
        if config.optimizer == "lars":
            return larsopt.LARS(groups, lr=config.peak_lr, momentum=config.momentum, eta=config.eta,
                                epsilon=TRUST_EPSILON)
        # SGD keeps the groups' "lars" flag only to log the trust ratio LARS would use.
        return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum)

    @property
    def trust_names(self) -> list[str]:
        return [name for name, _, _ in self.trust_layers]

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch

    def _autocast(self) -> Any:
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self) -> tuple[float, float]:
        """One optimisation step on the next batch; returns (loss, accuracy) of that batch."""
        if self.batch == 0:
            self.order = torch.randperm(len(self.x_train), generator=self.data_order).to(self.device)
            self.totals = _EpochTotals(trust_sum=[0.0] * len(self.trust_layers))
        assert self.order is not None
        started = time.perf_counter()
        indices = self.order[self.batch * self.config.batch_size:(self.batch + 1) * self.config.batch_size]
        inputs, labels = self.x_train[indices], self.y_train[indices]
        self.model.train()
        with self._autocast():
            logits = self.model(inputs)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        ratios = trust_ratios(self.trust_layers, self.config.eta, self.scaler.get_scale() if
                              self.scaler.is_enabled() else 1.0)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        batch_loss = loss.item()
        batch_correct = int((logits.argmax(dim=1) == labels).sum().item())
        totals = self.totals
        totals.loss_sum += batch_loss * len(labels)
        totals.correct += batch_correct
        totals.seen += len(labels)
        totals.trust_sum = [total + ratio for total, ratio in zip(totals.trust_sum, ratios)]
        totals.trust_steps += 1
        self.batch += 1
        elapsed = time.perf_counter() - started
        totals.train_time_s += elapsed
        self.elapsed_s += elapsed
        return batch_loss, batch_correct / len(labels)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(cross-entropy, accuracy) on the test split."""
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self.x_test), _EVAL_BATCH):
            inputs, labels = self.x_test[start:start + _EVAL_BATCH], self.y_test[start:start + _EVAL_BATCH]
            with self._autocast():
                logits = self.model(inputs).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum().item())
        return loss_sum / len(self.x_test), correct / len(self.x_test)

    def finish_epoch(self) -> dict[str, Any]:
        """Evaluate, log the epoch's metrics row and trust ratios, move to the next epoch."""
        started = time.perf_counter()
        test_loss, test_accuracy = self.evaluate()
        self.elapsed_s += time.perf_counter() - started
        totals = self.totals
        row = {
            "epoch": self.epoch + 1,
            "step": (self.epoch + 1) * self.steps_per_epoch,
            "lr": self.last_lr,
            "train_loss": totals.loss_sum / totals.seen,
            "train_accuracy": totals.correct / totals.seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "epoch_time_s": totals.train_time_s,
            "samples_per_s": totals.seen / totals.train_time_s if totals.train_time_s > 0 else None,
            "elapsed_s": self.elapsed_s,
        }
        self.metrics.append(row)
        self.trust_history.append([total / totals.trust_steps for total in totals.trust_sum])
        self.epoch += 1
        self.batch = 0
        self.order = None
        return row

    def run(self, stop: StopRequest, on_step: Callable[[float, float], None],
            on_epoch: Callable[[dict[str, Any]], None], on_checkpoint: Callable[[], None] | None) -> bool:
        """Train to the end; returns False when stopped by ``stop`` (after ``on_checkpoint``)."""
        while not self.done:
            batch_loss, batch_accuracy = self.train_step()
            on_step(batch_loss, batch_accuracy)
            if self.batch == self.steps_per_epoch:
                on_epoch(self.finish_epoch())
                if on_checkpoint and (self.epoch % self.config.checkpoint_every == 0 or self.done):
                    on_checkpoint()
            if stop.requested and not self.done:
                if on_checkpoint:
                    on_checkpoint()
                return False
        return True

    def result(self, interrupted: bool) -> RunResult:
        """The run's history and speed so far."""
        train_time = sum(row["epoch_time_s"] for row in self.metrics)
        seen = len(self.x_train) * len(self.metrics)
        return RunResult(
            metrics=self.metrics, trust_names=self.trust_names, trust_history=self.trust_history,
            wall_time_s=self.elapsed_s, samples_per_s=seen / train_time if train_time > 0 else float("nan"),
            interrupted=interrupted)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (tensors and plain values only)."""
        state: dict[str, Any] = {
            "format": _CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_order_rng": self.data_order.get_state(),
            "epoch": self.epoch,
            "batch": self.batch,
            "order": None if self.order is None else self.order.cpu(),
            "totals": asdict(self.totals),
            "metrics": self.metrics,
            "trust_history": self.trust_history,
            "elapsed_s": self.elapsed_s,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (of a run with the same config)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng"])
            self.data_order.set_state(state["data_order_rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
            self.order = None if state["order"] is None else state["order"].to(self.device)
            self.totals = _EpochTotals(**state["totals"])
            self.metrics = list(state["metrics"])
            self.trust_history = [list(row) for row in state["trust_history"]]
            self.elapsed_s = float(state["elapsed_s"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise UsageError(f"--resume: the checkpoint does not fit this run ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
