"""larsopt.mxnet under data parallelism, the way an MXNet kvstore/Horovod user runs it: each process
computes the gradient sum of its part of the batch, an all-reduce adds them (kvstore's push/pull),
and every process calls the updater with ``rescale_grad = 1 / global batch``. The weights then stay
identical on every process and equal one process's training on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_processes
from larsopt import mxnet as lmx

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

BATCH, STEPS = 12, 4


def _problem():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=generator, dtype=torch.float64),
               torch.randn(4, generator=generator, dtype=torch.float64)]
    x = torch.randn(STEPS, BATCH, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(STEPS, BATCH, 4, generator=generator, dtype=torch.float64)
    return weights, x, y


def _gradient_sums(weights, x, y):
    """Summed (not averaged) gradients of a squared loss over the rows of ``x``."""
    w, b = (t.clone().requires_grad_() for t in weights)
    ((x @ w.T + b - y) ** 2).sum().backward()
    return [w.grad, b.grad]


def _train(rank: int, world: int):
    weights, x, y = _problem()
    optimizer = lmx.LARS(learning_rate=0.5, momentum=0.9, wd=1e-3, eta=0.01, rescale_grad=1.0 / BATCH,
                         param_idx2name={0: "fc_weight", 1: "fc_bias"},
                         lr_scheduler=lmx.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.5))
    updater = lmx.get_updater(optimizer)
    rows = BATCH // world
    for step in range(STEPS):
        part = slice(rank * rows, (rank + 1) * rows)
        grads = _gradient_sums(weights, x[step, part], y[step, part])
        if world > 1:
            for grad in grads:
                dist.all_reduce(grad)  # kvstore push + pull
        updater([0, 1], grads, weights)
    return weights


def test_all_reduced_gradients_and_global_rescale_match_one_process():
    want = _train(0, 1)
    for result in run_processes(2, _train):
        for got, expected in zip(result, want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
