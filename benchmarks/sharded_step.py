"""Sharded LARS step on ResNet-50 or BERT-base shapes: FSDP2-style ``Shard(0)`` DTensors over N gloo
processes against one process, and what LARS communicates per step.

    python benchmarks/sharded_step.py --world 2 --set resnet50 --steps 30

Each process holds its ``torch.chunk`` shard of every tensor (as ``fully_shard`` does), with random
gradients of the same placements; the table gives the median step time per process count, the
number of all-reduces ``step()`` issues (counted by wrapping ``torch.distributed.all_reduce``) and
their bytes. On a machine with fewer cores than processes times threads, the processes compete:
compare per-element cost (``ms/M``: per million elements held), not wall time alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import larsopt
from larsopt.bench import param_set_shapes


def _run(rank: int, world: int, rendezvous: str, shapes: list[tuple[int, ...]], steps: int, threads: int,
         results: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.randn(shape), mesh, [Shard(0)])
        params.append(param)
    optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9, weight_decay=5e-5, eta=0.001)
    for _ in range(3):
        optimizer.step()
    calls: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    times = []
    for _ in range(steps):
        dist.barrier()
        calls.clear()
        dist.all_reduce = counting
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
        dist.all_reduce = original
    local = sum(p.to_local().numel() for p in params)
    torch.save({"ms": statistics.median(times) * 1e3, "calls": len(calls), "bytes": sum(calls), "local": local},
               os.path.join(results, f"{rank}.pt"))
    dist.destroy_process_group()


def measure(world: int, shapes: list[tuple[int, ...]], steps: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        mp.start_processes(_run, args=(world, os.path.join(scratch, "rendezvous"), shapes, steps, threads, scratch),
                           nprocs=world, start_method="spawn")
        ranks = [torch.load(os.path.join(scratch, f"{rank}.pt")) for rank in range(world)]
    ms = max(result["ms"] for result in ranks)
    local = max(result["local"] for result in ranks)
    return {"world": world, "ms": ms, "ms_per_million": ms / (local / 1e6), "calls": ranks[0]["calls"],
            "bytes": ranks[0]["bytes"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="resnet50", choices=("resnet50", "bert", "small"))
    parser.add_argument("--world", type=int, default=2, help="the sharded run's process count (default 2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args(argv)
    shapes = param_set_shapes(args.set)
    print(f"{args.set}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes):,} elements, "
          f"{args.threads} thread(s) per process")
    print("| processes | step ms | ms per M local elements | all-reduces per step | bytes per step |")
    print("|---:|---:|---:|---:|---:|")
    for world in (1, args.world):
        row = measure(world, shapes, args.steps, args.threads)
        print(f"| {row['world']} | {row['ms']:.2f} | {row['ms_per_million']:.3f} | {row['calls']} | {row['bytes']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
