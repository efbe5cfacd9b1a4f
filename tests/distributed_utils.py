"""Run a function on N gloo processes on this machine (CPU), for the sharded-training tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _worker(rank: int, world: int, rendezvous: str, out: str, function: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # the processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = function(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_processes(world: int, function: Callable[..., Any], *args: Any) -> list[Any]:
    """``function(rank, world, *args)`` on ``world`` processes; returns each rank's result.

    ``function`` must be importable by name (defined at module level in a test file)."""
    with tempfile.TemporaryDirectory() as scratch:
        rendezvous = os.path.join(scratch, "rendezvous")
        context = mp.start_processes(_worker, args=(world, rendezvous, scratch, function, args), nprocs=world,
                                     join=False, start_method="spawn")
        while not context.join(timeout=TIMEOUT_S):
            pass
        return [torch.load(Path(scratch) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
