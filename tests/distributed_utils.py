"""Run a function on N gloo processes on this machine (CPU), for the sharded-training tests."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: How long a collective may wait for the other ranks before it raises (gloo's default is 30 minutes,
#: so a rank that failed before a collective would leave the others, and the test run, hanging).
COLLECTIVE_TIMEOUT_S = 60
#: How long one run of processes may take in all before it is killed.
RUN_TIMEOUT_S = 300

_TESTS_DIR = str(Path(__file__).resolve().parent)
#: Imported once by the fork server that every process of a test session is forked from: importing
#: torch and larsopt takes 5-7 s per process on a busy two-core machine, far longer than the tests.
#: (torch._dynamo: what the fused CPU path and FSDP2 import on first use, 2-3 s of it.)
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint", "torch.distributed.fsdp",
            "torch.distributed.optim", "torch.distributed.tensor", "torch.distributed.tensor.parallel",
            "larsopt", "larsopt.functional", "larsopt.grouping", "larsopt.optim", "distributed_utils"]


def _worker(rank: int, world: int, rendezvous: str, out: str, function: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # the processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = function(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _start_fork_server() -> None:
    """Start the fork server (once per session) with the test folder importable, so that its
    children can unpickle test functions by module name (the server does not take the parent's
    ``sys.path``, only its environment)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    path = os.pathsep.join(filter(None, [_TESTS_DIR, os.environ.get("PYTHONPATH")]))
    with _environment("PYTHONPATH", path):
        multiprocessing.forkserver.ensure_running()


def run_processes(world: int, function: Callable[..., Any], *args: Any) -> list[Any]:
    """``function(rank, world, *args)`` on ``world`` processes; returns each rank's result.

    ``function`` must be importable by name (defined at module level in a test file). A process
    that fails makes this raise with its traceback; a run longer than :data:`RUN_TIMEOUT_S` is
    killed and raises ``TimeoutError``."""
    _start_fork_server()
    with tempfile.TemporaryDirectory() as scratch:
        rendezvous = os.path.join(scratch, "rendezvous")
        context = mp.start_processes(_worker, args=(world, rendezvous, scratch, function, args), nprocs=world,
                                     join=False, start_method="forkserver")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{function.__name__} on {world} processes took over {RUN_TIMEOUT_S} s")
        return [torch.load(Path(scratch) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
