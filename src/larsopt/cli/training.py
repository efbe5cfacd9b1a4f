"""The training loop behind ``larsopt train`` and ``larsopt compare``.

Reproducibility and resumption: the model is initialised from ``torch.manual_seed(seed)``; the
data order and the augmentation come from their own generators seeded from ``seed``. A
checkpoint holds everything the rest of the run depends on (model, optimizer, scheduler, grad
scaler, the random generators, the position inside the epoch with that epoch's order, the running
sums and the logged history), so a run resumed from any checkpoint ends with exactly the weights
and metrics of a run that was never stopped (timing fields aside).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from larsopt import functional
from larsopt.cli import models, optimizers
from larsopt.cli.config import SEED_LIMIT, RunConfig, checkpoint_interval_parts
from larsopt.cli.data import Dataset
from larsopt.cli.distributed import Processes
from larsopt.cli.errors import UsageError
from larsopt.cli.optimizers import TRUST_EPSILON
from larsopt.telemetry import COLUMNS, Accumulator, Telemetry

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_EVAL_BATCH = 1024
_CHECKPOINT_FORMAT = 1
# The augmentation generator's seed is the run's seed with these bits flipped: its own stream,
# not the data order's (nor another seed's data order).
_AUGMENT_SEED_BITS = 0x9E3779B97F4A7C15
assert _AUGMENT_SEED_BITS < SEED_LIMIT
COMPLETED, STOPPED, DIVERGED = "completed", "stopped", "diverged"
# The per-param counts of a LARS run kept for summary.json, columns of larsopt.telemetry's
# accumulator: steps counted (AMP did not skip them), steps AMP skipped, steps that took the
# trust-ratio fallback (lam = 1) and why, steps whose ratio the LARC clip capped.
TELEMETRY_COUNTS = ("steps", "skipped", "fallback", "fallback_zero_w", "fallback_zero_g", "fallback_not_finite",
                    "clipped")


@dataclass
class RunResult:
    """What a finished (or interrupted, or diverged) run reports."""

    metrics: list[dict[str, Any]]
    trust_names: list[str]
    trust_history: list[list[float]]
    wall_time_s: float
    samples_per_s: float
    status: str

    @property
    def final_test_accuracy(self) -> float | None:
        return self.metrics[-1]["test_accuracy"] if self.metrics else None

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


class Interrupted(KeyboardInterrupt):
    """A second stop signal: stop at once. ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and ``timeout`` send before killing)
    sets :attr:`signum`; the loop saves a checkpoint at the next step boundary and stops. A
    second signal stops at once. Under torchrun a rank also stops for another rank's signal
    (:attr:`agreed`, set by the loop), which is not a first signal of its own.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
        signum = self.agreed or self.signum
        assert signum is not None
        return 128 + signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch the stop signals while the block runs (only possible in the main thread;
        elsewhere they keep their default meaning)."""
        previous = {}
        try:
            for signum in self.SIGNALS:
                previous[signum] = signal.signal(signum, self._handle)
        except ValueError:
            pass
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class StepReport(NamedTuple):
    """One step: its loss (mean over the global batch), accuracy and samples, and what every rank
    agreed to do next: stop (``stop_signum``, 0 for no) and checkpoint now (``checkpoint_due``)."""

    loss: float
    accuracy: float
    samples: int
    stop_signum: int
    checkpoint_due: bool


@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_time_s: float = 0.0
    trust_sum: list[float] = field(default_factory=list)
    trust_steps: int = 0


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """The standard image augmentation: a random crop of the image padded by an eighth of its
    side (4 pixels at 32x32; the padding is 0, the training mean after standardisation) and a
    horizontal flip with probability 1/2, drawn per image from ``generator`` (on the CPU, so a
    run is the same on every device)."""
    count, _, height, width = images.shape
    pad = max(1, min(height, width) // 8)
    padded = nn.functional.pad(images, (pad, pad, pad, pad))
    shift_y = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
    shift_x = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    rows = shift_y[:, None] + torch.arange(height)
    columns = shift_x[:, None] + torch.arange(width)
    columns = torch.where(flip[:, None], columns.flip(1), columns)
    index = [tensor.to(images.device) for tensor in (torch.arange(count)[:, None, None], rows[:, :, None],
                                                      columns[:, None, :])]
    # Advanced indices around a slice put their dimensions first: (count, height, width, channels).
    return padded[index[0], :, index[1], index[2]].permute(0, 3, 1, 2).contiguous()


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of a sharded (FSDP) param or gradient, gathered from every rank."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def trust_ratios(layers: list[tuple[str, Tensor, float]], eta: float, grad_scale: float) -> list[float]:
    """The trust ratio ``eta * |w| / (|g| + wd * |w| + eps)`` LARS's default settings would give
    each layer (1 where |w| or |g| is 0 or not finite), from gradients divided by ``grad_scale``
    (AMP): what ``--optimizer sgd`` runs log, as SGD has no ratio of its own. Sharded (FSDP)
    tensors are gathered whole first.

    The ratios are stacked and read back once, so on a GPU logging costs one synchronisation per
    step.
    """
    if not layers:
        return []
    ratios = [
        functional.trust_ratio(
            torch.linalg.vector_norm(_full(param), dtype=torch.float32),
            _full(param.grad) / grad_scale if param.grad is not None else torch.zeros_like(_full(param)),
            _full(param),
            weight_decay=decay,
            eta=eta,
            epsilon=TRUST_EPSILON,
            trust_norm="sum",
        )
        for _, param, decay in layers
    ]
    return torch.stack(ratios).tolist()


def applied_trust_ratios(telemetry: Telemetry, names: list[str]) -> list[float]:
    """The trust ratio the last LARS step applied to each of ``names`` (nan for a param it did not
    step: one without a gradient), read back once."""
    rows = {name: row for row, name in enumerate(telemetry.names)}
    present = [rows[name] for name in names if name in rows]
    ratios = iter(telemetry.values[present, COLUMNS.index("trust_ratio")].tolist())
    return [next(ratios) if name in rows else math.nan for name in names]


class Trainer:
    """One run: model, optimizer, schedule, data order, and its logged history.

    ``config`` must be resolved (:meth:`RunConfig.resolved`); the thread count is the caller's
    to apply. Under torchrun (``processes``) every rank builds its own trainer: the input checks
    come first, then the ranks agree (the first collective), then the model is shared.
    """

    def __init__(self, config: RunConfig, dataset: Dataset, processes: Processes = Processes()) -> None:
        config.check()
        self.config = config
        self.processes = processes
        self.device = torch.device(config.device)
        try:
            torch.manual_seed(config.seed)
            self.model = models.build(config.model, dataset.input_shape, dataset.num_classes).to(self.device)
            self.x_train, self.y_train = dataset.x_train.to(self.device), dataset.y_train.to(self.device)
            self.x_test, self.y_test = dataset.x_test.to(self.device), dataset.y_test.to(self.device)
            models.check_fits(self.model, config.model, self.x_train[:2], dataset.num_classes)
            if config.batch_size > len(dataset.x_train):
                raise UsageError(f"--batch-size {config.batch_size}: larger than the training set of {dataset.name} "
                                 f"({len(dataset.x_train)} samples); use at most {len(dataset.x_train)}")
            last_batch = len(dataset.x_train) % config.batch_size
            if 0 < last_batch < processes.world_size:
                raise UsageError(f"--batch-size {config.batch_size} on {processes.world_size} processes: the last "
                                 f"batch of each epoch ({len(dataset.x_train)} mod {config.batch_size} = {last_batch} "
                                 "samples) "
                                 "leaves a process without samples; choose a batch size that divides the "
                                 f"{len(dataset.x_train)} training samples or leaves at least {processes.world_size}")
        except UsageError as error:
            processes.agree(error)  # (raises it on every rank)
        processes.agree()
        self.steps_per_epoch = math.ceil(len(self.x_train) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.module = processes.wrap(self.model, self.device)
        self.optimizer = optimizers.build(config, self.model)
        warmup_steps = min(self.total_steps, max(0, round(config.warmup_epochs * self.steps_per_epoch)))
        self.schedule = WarmupThenDecay(config.schedule, warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.data_order = torch.Generator().manual_seed(config.seed)
        self.augment = config.augment and self.x_train.ndim == 4
        self.augment_rng = torch.Generator().manual_seed(config.seed ^ _AUGMENT_SEED_BITS)
        self.trust_layers = optimizers.trust_layers(self.optimizer)
        self.epoch = 0
        self.batch = 0
        self.order: Tensor | None = None
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.totals = _EpochTotals()
        self.metrics: list[dict[str, Any]] = []
        self.trust_history: list[list[float]] = []
        self.elapsed_s = 0.0
        self.diverged = False
        # LARS runs: every step folded in on the device, read back into the run's counts (plain
        # ints, saved in the checkpoint) at each epoch's end and checkpoint.
        self.counts = Accumulator(self.optimizer) if self.reports_trust else None
        self.telemetry_counts: dict[str, dict[str, Any]] = {}
        self.counted_from_step = 0

    @property
    def reports_trust(self) -> bool:
        """Whether the optimizer reports the trust ratios its steps applied: every one but SGD (a
        ``larsopt.LARS`` with telemetry)."""
        return self.config.optimizer != "sgd"

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

    def train_step(self, stop_signum: int = 0, checkpoint_due: bool = False) -> StepReport:
        """One optimisation step on the next batch; reports its loss, accuracy and samples, and
        the stop signal and checkpoint decision every rank agreed on (``stop_signum``,
        ``checkpoint_due``: this rank's). With ``accumulate`` N the batch (this rank's slice of
        it under torchrun) runs as N micro-batches whose gradients add up to the batch's, each
        micro-batch's mean loss weighted by its share of the global batch."""
        if self.batch == 0:
            self.order = torch.randperm(len(self.x_train), generator=self.data_order).to(self.device)
            self.totals = _EpochTotals(trust_sum=[0.0] * len(self.trust_layers))
        assert self.order is not None
        started = time.perf_counter()
        indices = self.order[self.batch * self.config.batch_size:(self.batch + 1) * self.config.batch_size]
        inputs, labels = self.x_train[indices], self.y_train[indices]
        if self.augment:
            # The whole batch on every rank: each image gets the draws it gets in one process.
            inputs = augment(inputs, self.augment_rng)
        count, world = len(labels), self.processes.world_size
        inputs, labels = self.processes.shard(inputs), self.processes.shard(labels)
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        pieces = [piece for piece in zip(inputs.tensor_split(self.config.accumulate),
                                         labels.tensor_split(self.config.accumulate)) if len(piece[1])]
        batch_loss_sum = torch.zeros((), device=self.device)
        batch_correct_sum = torch.zeros((), dtype=torch.int64, device=self.device)
        for number, (micro_inputs, micro_labels) in enumerate(pieces):
            with self.processes.gradient_sync(self.module, enabled=number == len(pieces) - 1):
                with self._autocast():
                    logits = self.module(micro_inputs)
                    loss = self.criterion(logits.float(), micro_labels)
                # DDP and FSDP divide the ranks' summed gradients by the number of ranks.
                share = len(micro_labels) * world / count
                if share != 1:
                    loss = loss * share
                self.scaler.scale(loss).backward()
            batch_loss_sum += loss.detach()
            batch_correct_sum += (logits.argmax(dim=1) == micro_labels).sum()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        ratios = None if self.reports_trust else trust_ratios(self.trust_layers, self.config.eta, scale)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # The scaler lowers its scale exactly when it skipped the step (an inf or NaN gradient).
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        if ratios is None and not skipped:
            ratios = applied_trust_ratios(self.optimizer.telemetry(), self.trust_names)
        batch_loss, batch_correct, stop_signum, checkpoint_due = self.processes.step_totals(
            batch_loss_sum, batch_correct_sum, stop_signum, checkpoint_due)
        totals = self.totals
        totals.loss_sum += batch_loss * count
        totals.correct += batch_correct
        totals.seen += count
        if not skipped:
            totals.trust_sum = [total + ratio for total, ratio in zip(totals.trust_sum, ratios)]
            totals.trust_steps += 1
        self.batch += 1
        elapsed = time.perf_counter() - started
        totals.train_time_s += elapsed
        self.elapsed_s += elapsed
        return StepReport(batch_loss, batch_correct / count, count, stop_signum, checkpoint_due)

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
        """Evaluate, log the epoch's metrics row and trust ratios, move to the next epoch; a loss
        that is not finite marks the run as diverged."""
        started = time.perf_counter()
        # Rank 0's numbers, so that every rank takes the same decisions from them (under DDP the
        # others skip the work; under FSDP every rank's forward takes part in the all-gathers).
        evaluated = self.evaluate() if self.processes.is_main or self.processes.sharded else None
        test_loss, test_accuracy = self.processes.from_main(evaluated)
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
        # (An epoch whose every step the AMP scaler skipped has no ratios.)
        self.trust_history.append([total / totals.trust_steps if totals.trust_steps else math.nan
                                   for total in totals.trust_sum])
        self.diverged = not (math.isfinite(row["train_loss"]) and math.isfinite(test_loss))
        self.fold_counts()
        self.epoch += 1
        self.batch = 0
        self.order = None
        return row

    def fold_counts(self) -> None:
        """Add the steps the accumulator holds to :attr:`telemetry_counts` (one read-back) and
        start it over."""
        if self.counts is None:
            return
        read = self.counts.read()
        if not read.names:
            return
        columns = [read.columns.index(column) for column in TELEMETRY_COUNTS]
        for name, adapted, row in zip(read.names, read.adapted, read.values[:, columns].tolist()):
            kept = self.telemetry_counts.setdefault(name, {"adapted": adapted, **dict.fromkeys(TELEMETRY_COUNTS, 0)})
            kept["adapted"] = adapted
            for column, value in zip(TELEMETRY_COUNTS, row):
                kept[column] += round(value)

    def telemetry_summary(self) -> dict[str, Any] | None:
        """The per-param counts of every step since :attr:`counted_from_step` (0 but for a run
        resumed from a checkpoint saved before they were kept), for summary.json; ``None`` for SGD."""
        if self.counts is None:
            return None
        self.fold_counts()
        return {"counted_from_step": self.counted_from_step,
                "params": {name: dict(counts) for name, counts in self.telemetry_counts.items()}}

    def run(self, stop: StopRequest, on_step: Callable[[float, float, int], None],
            on_epoch: Callable[[dict[str, Any]], None], on_checkpoint: Callable[[], None] | None) -> str:
        """Train to the end, checkpointing every ``checkpoint_every`` epochs or seconds and at
        the end. Returns :data:`COMPLETED`, :data:`STOPPED` (by ``stop``, after a checkpoint) or
        :data:`DIVERGED` (a loss that is not finite: training further would only compute NaNs)."""
        every_epochs, every_seconds = checkpoint_interval_parts(self.config.checkpoint_every)
        last_checkpoint = time.monotonic()

        def checkpoint() -> None:
            nonlocal last_checkpoint
            if on_checkpoint:
                on_checkpoint()
            last_checkpoint = time.monotonic()

        while not self.done and not self.diverged:
            # Under torchrun the ranks agree on both decisions at the step: clocks and signals
            # differ between processes, collectives must not.
            report = self.train_step(
                stop.signum or 0, every_seconds is not None and time.monotonic() - last_checkpoint >= every_seconds)
            on_step(report.loss, report.accuracy, report.samples)
            # One process stops for a signal that came during on_step too; under torchrun the ranks
            # stop at the step at which they agreed on it.
            stop.agreed = (report.stop_signum or None) if self.processes.launched else stop.signum
            if self.batch == self.steps_per_epoch:
                on_epoch(self.finish_epoch())
                if self.done or self.diverged or (every_epochs and self.epoch % every_epochs == 0):
                    checkpoint()
                    continue
            if report.checkpoint_due:
                checkpoint()
            if stop.agreed:
                checkpoint()
                return STOPPED
        return DIVERGED if self.diverged else COMPLETED

    def result(self, status: str) -> RunResult:
        """The run's history and speed so far."""
        train_time = sum(row["epoch_time_s"] for row in self.metrics)
        seen = len(self.x_train) * len(self.metrics)
        return RunResult(
            metrics=self.metrics, trust_names=self.trust_names, trust_history=self.trust_history,
            wall_time_s=self.elapsed_s, samples_per_s=seen / train_time if train_time > 0 else float("nan"),
            status=status)

    def _random_state(self) -> dict[str, Tensor]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (tensors and plain values only), as
        rank 0 saves it; under torchrun every rank must call it (it gathers their random
        states). Under FSDP the model and optimizer are not in it: they are saved sharded
        (:meth:`Processes.save_sharded`)."""
        random_states = self.processes.gather(self._random_state())
        self.fold_counts()
        state: dict[str, Any] = {
            "format": _CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "processes": {"parallel": self.processes.parallel, "world_size": self.processes.world_size},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": random_states[0]["torch"],
            "data_order_rng": self.data_order.get_state(),
            "augment_rng": self.augment_rng.get_state(),
            "epoch": self.epoch,
            "batch": self.batch,
            "order": None if self.order is None else self.order.cpu(),
            "totals": asdict(self.totals),
            "metrics": self.metrics,
            "trust_history": self.trust_history,
            "elapsed_s": self.elapsed_s,
            "diverged": self.diverged,
            "telemetry_counts": self.telemetry_counts,
            "counted_from_step": self.counted_from_step,
        }
        if not self.processes.sharded:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        if "cuda" in random_states[0]:
            state["cuda_rng"] = random_states[0]["cuda"]
        if len(random_states) > 1:
            state["rank_rng"] = random_states
        return state

    def load_state_dict(self, state: dict[str, Any], sharded_checkpoint: Path | None = None) -> None:
        """Continue from :meth:`state_dict` of a run with the same config, or with more or fewer
        ``epochs``: then the lr follows the schedule of the new length from the next step on.
        Under FSDP the model and optimizer come from ``sharded_checkpoint`` (every rank must call
        it then). Each rank takes its own saved random state, or rank 0's when the run was saved
        on another number of processes."""
        try:
            if sharded_checkpoint is not None:
                self.processes.load_sharded(sharded_checkpoint, self.model, self.optimizer)
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            ranks = state.get("rank_rng", [])
            random_state = ranks[self.processes.rank] if len(ranks) == self.processes.world_size else \
                {"torch": state["torch_rng"], **({"cuda": state["cuda_rng"]} if "cuda_rng" in state else {})}
            torch.set_rng_state(random_state["torch"])
            self.data_order.set_state(state["data_order_rng"])
            if "augment_rng" in state:
                self.augment_rng.set_state(state["augment_rng"])
            if "cuda" in random_state and self.device.type == "cuda":
                torch.cuda.set_rng_state(random_state["cuda"], self.device)
            self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
            self.order = None if state["order"] is None else state["order"].to(self.device)
            self.totals = _EpochTotals(**state["totals"])
            self.metrics = list(state["metrics"])
            self.trust_history = [list(row) for row in state["trust_history"]]
            self.elapsed_s = float(state["elapsed_s"])
            self.diverged = bool(state.get("diverged", False))
            if "telemetry_counts" in state:
                self.telemetry_counts = {name: dict(counts) for name, counts in state["telemetry_counts"].items()}
                self.counted_from_step = int(state["counted_from_step"])
            else:  # (saved before the counts were kept: they start here)
                self.telemetry_counts, self.counted_from_step = {}, self.global_step
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise UsageError(f"--resume: the checkpoint does not fit this run ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
        # LambdaLR restored the saved schedule's length along with its position.
        if self.schedule.total_steps != self.total_steps:
            self.schedule.total_steps = self.total_steps
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base_lr * self.schedule(self.scheduler.last_epoch)
