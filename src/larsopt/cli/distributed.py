"""``larsopt train`` under torchrun: the processes, how they agree, and how they share the model.

torchrun (``torchrun --nproc-per-node N -m larsopt train ...``) starts one process per rank with
RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous, MASTER_ADDR and MASTER_PORT) in their
environment. Every process builds the same model from the same seed and draws the same data order;
at each step rank r trains on the r-th of WORLD_SIZE slices of the global batch, its loss weighted by
its share of the batch, and DDP (gradients all-reduced) or FSDP2 (``fully_shard``: params sharded,
gradients reduce-scattered) averages the gradients over the ranks: the step is the one-process step
on the whole batch, up to the order of the float sums. Rank 0 alone writes the output folder and
prints.

Whatever could differ between the processes is agreed: bad input that any rank finds stops every
rank at the same point with that rank's message (printed by rank 0), and a stop signal or a
time-based checkpoint takes effect on every rank after the same step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from larsopt.cli.errors import OutputError, UsageError

PARALLEL_MODES = ("ddp", "fsdp")
#: What torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Processes:
    """The processes of one run: ``launched`` under torchrun, with ``parallel`` ``"ddp"`` or
    ``"fsdp"``; one process otherwise (the defaults)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    parallel: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def with_parallel(self, parallel: str | None) -> Processes:
        return dataclasses.replace(self, parallel=parallel)

    def describe(self) -> str:
        if not self.launched:
            return "1 process"
        return f"{self.world_size} process{'es' if self.world_size > 1 else ''} with --parallel {self.parallel}"

    def shard(self, tensor: Tensor) -> Tensor:
        """This rank's slice of a global batch: the ``rank``-th of ``world_size`` contiguous slices
        (``tensor_split``: sizes differ by at most one)."""
        return tensor.tensor_split(self.world_size)[self.rank]

    def from_main(self, value: Any = None, error: UsageError | None = None) -> Any:
        """Rank 0's ``value`` on every rank, or rank 0's ``error`` raised on every rank (the others
        pass nothing)."""
        if not self.launched:
            if error is not None:
                raise error
            return value
        box = [(value, None if error is None else str(error))] if self.is_main else [None]
        dist.broadcast_object_list(box, src=0)
        value, message = box[0]
        if message is not None:
            raise UsageError(message)
        return value

    def agree(self, error: UsageError | None = None) -> None:
        """Raise on every rank if any rank has an ``error``: the first failing rank's message
        (named when it is not rank 0). Every rank must call it at the same point."""
        if not self.launched:
            if error is not None:
                raise error
            return
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        for rank, message in enumerate(messages):
            if message is not None:
                raise UsageError(message if rank == 0 else f"rank {rank}: {message}")

    def step_totals(self, loss: Tensor, correct: Tensor, stop_signum: int, checkpoint_due: bool
                    ) -> tuple[float, int, int, bool]:
        """The step's loss (the mean over the global batch), its correct predictions, and the
        agreed stop signal (0: none) and checkpoint decision: one all-gather per step.

        ``loss`` is this rank's share-weighted loss, which sums over the ranks to ``world_size``
        times the global mean (DDP and FSDP divide the gradients' sum by ``world_size``)."""
        if not self.launched:
            return loss.item(), int(correct.item()), stop_signum, checkpoint_due
        mine = torch.tensor([loss.item(), correct.item(), stop_signum, checkpoint_due], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        table = torch.stack(every)
        return (table[:, 0].sum().item() / self.world_size, int(table[:, 1].sum().item()),
                int(table[:, 2].max().item()), bool(table[:, 3].max().item()))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.launched:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: ``model`` itself, in DDP, or sharded in place by ``fully_shard``
        (each child module with params, then the whole model, as FSDP2 recommends)."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # (--device cuda is the GPU torch.cuda.set_device chose for this rank: LOCAL_RANK.)
            return DistributedDataParallel(
                model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            for child in model.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    @contextmanager
    def gradient_sync(self, module: nn.Module, enabled: bool) -> Iterator[None]:
        """Reduce the gradients over the ranks in this backward pass only when ``enabled`` (the
        last micro-batch of an accumulated step): the others only add up locally."""
        if self.parallel == "ddp" and not enabled:
            with module.no_sync():
                yield
            return
        if self.parallel == "fsdp":
            module.set_requires_gradient_sync(enabled)
        yield

    def save_sharded(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the sharded model and optimizer with ``torch.distributed.checkpoint`` into the new
        ``folder``: every rank writes its shards, rank 0 the metadata last."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
        except CheckpointException as error:
            raise OutputError(f"cannot write the sharded checkpoint {folder} ({_first_failure(error)})") from None

    def load_sharded(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load what :meth:`save_sharded` wrote, resharded to this number of processes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(state, checkpoint_id=folder)
        except CheckpointException as error:
            raise UsageError(f"--resume: cannot read the sharded checkpoint {folder} ({_first_failure(error)})") \
                from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _first_failure(error: Any) -> str:
    failures = getattr(error, "failures", {})
    for rank, (failure, _) in sorted(failures.items()):
        return f"rank {rank}: {type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    return str(error).splitlines()[0]


def detect() -> Processes:
    """The processes torchrun started (from its environment), or one process."""
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return Processes()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UsageError(f"{', '.join(present)} set but not {', '.join(missing)}: start larsopt train with torchrun "
                         "(torchrun --nproc-per-node N -m larsopt train ...) or without these variables")
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        values = ", ".join(f"{name}={os.environ[name]!r}" for name in TORCHRUN_VARIABLES)
        raise UsageError(f"torchrun environment {values}: expected integers") from None
    if not (world_size > 0 and 0 <= rank < world_size and local_rank >= 0):
        raise UsageError(f"torchrun environment RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: "
                         "expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, launched=True)


@contextmanager
def process_group(processes: Processes) -> Iterator[None]:
    """Join the processes torchrun started for the block (gloo for CPU tensors, NCCL for CUDA
    ones where torch sees a GPU), then leave. Nothing to do in one process, or when the calling
    program has already joined a group."""
    if not processes.launched or dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"cannot join the other torchrun processes ({str(error).splitlines()[0]})") from None
    try:
        yield
    finally:
        dist.destroy_process_group()
