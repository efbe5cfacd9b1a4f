"""DTensor params (FSDP2) on every impl: no crash in the fast paths, and the single-process numbers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import larsopt
from distributed_utils import run_processes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

HYPER = dict(lr=0.5, momentum=0.9, weight_decay=0.01, eta=0.02)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)


def _fsdp_steps(rank: int, world: int, impl: str) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = larsopt.LARS(model.parameters(), impl=impl, **HYPER)
    x, y = _batch()
    rows = len(x) // world
    for _ in range(3):
        opt.zero_grad()
        ((model(x[rank * rows:(rank + 1) * rows]) - y[rank * rows:(rank + 1) * rows]) ** 2).mean().backward()
        opt.step()
    return [p.full_tensor() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "reference"])
def test_fsdp2_params_step_like_one_process(impl):
    model = _model()
    opt = larsopt.LARS(model.parameters(), impl="reference", **HYPER)
    x, y = _batch()
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    for result in run_processes(2, _fsdp_steps, impl):
        for got, want in zip(result, model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def _layouts_differ_by_rank(rank: int, world: int) -> list[torch.Tensor]:
    """W and P sharded on dim 1; W's local gradient is a transposed view on rank 0 only, P's a strided
    view on rank 1 only: the ranks' layouts differ, their paths and collectives must not."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    w, p = (torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(1)])) for t in full[:2])
    gw, gp = (distribute_tensor(t, mesh, [Shard(1)]).to_local() for t in full[2:])
    if rank == 0:
        gw = gw.t().contiguous().t()
    else:
        strided = torch.zeros(gp.shape[0], gp.shape[1] * 2, dtype=gp.dtype)
        strided[:, ::2] = gp
        gp = strided[:, ::2]
    w.grad = DTensor.from_local(gw, mesh, [Shard(1)], shape=w.shape, stride=w.stride())
    p.grad = DTensor.from_local(gp, mesh, [Shard(1)], shape=p.shape, stride=p.stride())
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        larsopt.LARS([w, p], lr=1.0, eta=0.5, momentum=0.9).step()
    finally:
        dist.all_reduce = original
    return [w.full_tensor(), p.full_tensor(), torch.tensor(len(calls))]


def test_ranks_whose_shard_layouts_differ_step_alike():
    torch.manual_seed(0)
    full = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    params = [torch.nn.Parameter(t.clone()) for t in full[:2]]
    for param, grad in zip(params, full[2:]):
        param.grad = grad
    larsopt.LARS(params, lr=1.0, eta=0.5, momentum=0.9, impl="reference").step()
    for result in run_processes(2, _layouts_differ_by_rank):
        for got, want in zip(result[:2], params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
        assert result[2].item() == 1  # Shard(0) and Shard(1) on one mesh dim: one reduction
