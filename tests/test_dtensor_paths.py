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
