"""Sharded and data-parallel LARS (issue 12) on gloo processes: FSDP2 (2 and 3 processes, uneven and
empty shards), HSDP (2 x 2), tensor-parallel DTensors (1-D and 2-D meshes), DDP and ZeRO give the
trajectory of single-process LARS on the full tensors with the same global batch; a step's number of
collectives does not grow with the number of tensors; a sharded step never syncs with the host; a
distributed checkpoint resumes exactly; bad sharded input is refused naming the param.

Each world size is one run of processes that steps every configuration and returns every result
(a failing configuration returns its traceback), so the tests below only compare.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import larsopt
from distributed_utils import run_processes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

if dist.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
else:  # (the module must import for pytest to report the skip)
    DTensor = Partial = Replicate = Shard = None

IMPLS = ("auto", "foreach", "reference")
STEPS = 4
BASE_LR = 0.5
#: The lr of each step, as a factor of BASE_LR: it changes at every step, where the two momentum
#: forms differ.
LR_FACTORS = (1.0, 0.5, 0.8, 0.3)
#: epsilon is large enough to matter: a norm reduced over a replicating mesh dim as well (HSDP) is
#: sqrt(2) too large for |w| and |g| alike, which only epsilon makes visible in the trust ratio.
HYPER = dict(momentum=0.9, eta=0.05, epsilon=1e-3, weight_decay=1e-2)
GLOBAL_BATCH = 12  # divisible by every world size here
#: float64: every rank computes exactly what one process does up to the order of the norms'
#: summation (and of the gradient averaging), about 1e-16 relative.
FLOAT64_TOLERANCE = 1e-9
#: bfloat16 params with float32 masters: the masters differ from one process's by the float32
#: rounding of the norms' sums in another order (about 1e-7 relative), which moves the update by as
#: much and can flip the last float32 bit of a master; the params are the masters rounded to
#: bfloat16, so a master that close to a rounding boundary can round the other way: one bfloat16
#: ulp (2**-7 relative at most) on top.
BF16_TOLERANCE = 1e-4
BF16_ULP = 2.0 ** -7

#: Tensor-parallel params on a 1-D mesh of 2: name, full shape, placements. Uneven splits (5 rows,
#: 5 columns over 2) and an empty shard (1 row over 2).
TENSOR_PARALLEL_1D = (
    ("col.weight", (5, 4), "S0"),
    ("col.bias", (5,), "S0"),
    ("row.weight", (3, 5), "S1"),
    ("row.bias", (3,), "R"),
    ("head.weight", (1, 3), "S0"),
)
#: On a 2 x 2 mesh: sharded on both mesh dims (each dim a different tensor dim, or both the same),
#: on one (the other replicating), on none; an uneven split and an empty shard.
TENSOR_PARALLEL_2D = (
    ("a.weight", (6, 5), "S0 S1"),
    ("a.bias", (6,), "S0 R"),
    ("b.weight", (4, 6), "R S0"),
    ("b.bias", (4,), "R R"),
    ("c.weight", (8, 3), "S0 S0"),
    ("d.weight", (1, 4), "R S0"),
)


# --------------------------------------------------------------------------------------------------
# Configurations


def _configs() -> dict[str, dict[str, Any]]:
    """In float64, each impl with both momentum forms x both trust norms and nesterov on in half of
    them, so that every pair of these settings' values meets; lr as a tensor or from an LR
    scheduler, and the two exclusion rules (``lars=False`` groups without or with weight decay),
    alternate. Then bfloat16 params with masters once per impl."""
    configs = {}
    for number, impl in enumerate(IMPLS):
        for form, norm in itertools.product(("paper", "torch"), ("sum", "update")):
            nesterov = (form == "torch") != (norm == "update")
            configs[f"{impl}-{form}-{norm}{'-nesterov' if nesterov else ''}"] = dict(
                impl=impl, momentum_form=form, trust_norm=norm, nesterov=nesterov, dtype=torch.float64,
                multi_precision=False, lr_source="tensor" if norm == "sum" else "scheduler",
                exclude=("ndim", "mxnet")[(number + (form == "torch")) % 2])
    for number, impl in enumerate(IMPLS):
        configs[f"{impl}-bfloat16-masters"] = dict(
            impl=impl, momentum_form=("paper", "torch")[number % 2], trust_norm=("sum", "update")[number % 2],
            nesterov=number == 1, dtype=torch.bfloat16, multi_precision=True,
            lr_source=("tensor", "scheduler")[number % 2], exclude="ndim")
    return configs


CONFIGS = _configs()


class _LearningRate:
    """Sets the lr of each step: a 0-d tensor filled in place, or a LambdaLR scheduler."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.tensor = torch.tensor(BASE_LR, dtype=torch.float64) if config["lr_source"] == "tensor" else None
        self.scheduler = None

    @property
    def initial(self) -> float | torch.Tensor:
        return BASE_LR if self.tensor is None else self.tensor

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self.tensor is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: LR_FACTORS[step % len(LR_FACTORS)])

    def before_step(self, step: int) -> None:
        if self.tensor is not None:
            self.tensor.fill_(BASE_LR * LR_FACTORS[step])

    def after_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


def _lars(groups: list[dict[str, Any]], config: dict[str, Any], lr: _LearningRate) -> larsopt.LARS:
    optimizer = larsopt.LARS(groups, **_lars_arguments(config, lr))
    lr.attach(optimizer)
    return optimizer


def _lars_arguments(config: dict[str, Any], lr: _LearningRate) -> dict[str, Any]:
    return dict(lr=lr.initial, impl=config["impl"], momentum_form=config["momentum_form"],
                trust_norm=config["trust_norm"], nesterov=config["nesterov"],
                multi_precision=config["multi_precision"], **HYPER)


# --------------------------------------------------------------------------------------------------
# Models, data and hand-set gradients


def _model(dtype: torch.dtype) -> torch.nn.Module:
    """Layers of 5 and 1 outputs: over 2, 3 or 4 shards, uneven splits and empty shards."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).to(dtype)


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 1, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _rows(tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    size = len(tensor) // parts
    return tensor[part * size:(part + 1) * size]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _hand_grad(step: int, number: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + number)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _initial_tensor(number: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(number)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _placements(code: str) -> list[Any]:
    """``"S0 R"`` -> ``[Shard(0), Replicate()]``."""
    return [Replicate() if part == "R" else Shard(int(part[1:])) for part in code.split()]


# --------------------------------------------------------------------------------------------------
# Trajectories: the params (and masters) after each step


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _snapshot(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None) -> dict:
    """Full params, the full gradients they were last stepped with, and full masters where
    ``optimizer`` keeps them (a collective under sharding: every rank calls it)."""
    params = {name: _full(param) for name, param in named_params}
    grads = {name: _full(param.grad) for name, param in named_params if param.grad is not None}
    masters = {}
    if optimizer is not None:
        for name, param in named_params:
            if "master_param" in optimizer.state.get(param, {}):
                masters[name] = _full(optimizer.state[param]["master_param"])
    return dict(params=params, grads=grads, masters=masters)


def _model_trajectory(model: torch.nn.Module, named_params: list[tuple[str, torch.Tensor]],
                      optimizer: torch.optim.Optimizer, lr: _LearningRate, config: dict[str, Any],
                      part: int, parts: int, optimizer_state: torch.optim.Optimizer | None) -> list[dict]:
    trajectory = [_snapshot(named_params, None)]
    for step in range(STEPS):
        x, y = _batch(step, config["dtype"])
        optimizer.zero_grad()
        _loss(model, _rows(x, part, parts), _rows(y, part, parts)).backward()
        lr.before_step(step)
        optimizer.step()
        lr.after_step()
        trajectory.append(_snapshot(named_params, optimizer_state))
    return trajectory


def _single_process_model_trajectory(config: dict[str, Any]) -> list[dict]:
    model = _model(config["dtype"])
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
    return _model_trajectory(model, list(model.named_parameters()), optimizer, lr, config, 0, 1, optimizer)


def _tensor_trajectory(named_params: list[tuple[str, torch.Tensor]], config: dict[str, Any],
                       grad: Callable[[int, int, torch.Tensor], torch.Tensor]) -> list[dict]:
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(named_params, exclude=config["exclude"]), config, lr)
    trajectory = [_snapshot(named_params, None)]
    for step in range(STEPS):
        for number, (_, param) in enumerate(named_params):
            param.grad = grad(step, number, param)
        lr.before_step(step)
        optimizer.step()
        lr.after_step()
        trajectory.append(_snapshot(named_params, optimizer))
    return trajectory


def _single_process_tensor_trajectory(layout: tuple, config: dict[str, Any]) -> list[dict]:
    named_params = [(name, torch.nn.Parameter(_initial_tensor(number, shape, config["dtype"])))
                    for number, (name, shape, _) in enumerate(layout)]
    return _tensor_trajectory(named_params, config,
                              lambda step, number, param: _hand_grad(step, number, param.shape, param.dtype))


def _single_process_replay(run: list[dict], config: dict[str, Any]) -> list[dict]:
    """Single-process LARS from a run's initial params, stepped with the run's own full gradients."""
    named_params = [(name, torch.nn.Parameter(param.clone())) for name, param in run[0]["params"].items()]
    return _tensor_trajectory(named_params, config,
                              lambda step, number, param: run[step + 1]["grads"][named_params[number][0]])


@functools.cache
def _expected_with_same_batch(front_end: str, label: str) -> list[dict]:
    """Single-process LARS on the full tensors, with the same global batch (or the same hand-set
    gradients), for a front-end's run of ``CONFIGS[label]``."""
    config = CONFIGS[label]
    if front_end == "tensor parallel 1-D":
        return _single_process_tensor_trajectory(TENSOR_PARALLEL_1D, config)
    if front_end == "tensor parallel 2-D":
        return _single_process_tensor_trajectory(TENSOR_PARALLEL_2D, config)
    return _single_process_model_trajectory(config)


def _expected(front_end: str, label: str, run: list[dict]) -> list[dict]:
    """What ``run`` (rank 0's) must equal. A model's bfloat16 gradients depend on how the batch is
    split across ranks and on the precision of their averaging (FSDP2's reduce-scatter and DDP's
    all-reduce average in bfloat16), so there one process replays the run's own gradients."""
    if CONFIGS[label]["dtype"] == torch.bfloat16 and not front_end.startswith("tensor parallel"):
        return _single_process_replay(run, CONFIGS[label])
    return _expected_with_same_batch(front_end, label)


# --------------------------------------------------------------------------------------------------
# The front-ends, on each rank


def _sharded_model(mesh: Any, dtype: torch.dtype) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_run(rank: int, world: int, mesh: Any, config: dict[str, Any]) -> list[dict]:
    model = _sharded_model(mesh, config["dtype"])
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
    named_params = list(model.named_parameters())
    return _model_trajectory(model, named_params, optimizer, lr, config, rank, world, optimizer)


def _tensor_parallel_run(mesh: Any, layout: tuple, config: dict[str, Any]) -> list[dict]:
    from torch.distributed.tensor import distribute_tensor

    named_params = [
        (name, torch.nn.Parameter(distribute_tensor(_initial_tensor(number, shape, config["dtype"]), mesh,
                                                    _placements(code))))
        for number, (name, shape, code) in enumerate(layout)]

    def grad(step: int, number: int, param: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(_hand_grad(step, number, param.shape, param.dtype), mesh, param.placements)

    return _tensor_trajectory(named_params, config, grad)


def _ddp_run(rank: int, world: int, config: dict[str, Any]) -> list[dict]:
    model = torch.nn.parallel.DistributedDataParallel(_model(config["dtype"]))
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model.module, exclude=config["exclude"]), config, lr)
    named_params = list(model.module.named_parameters())
    return _model_trajectory(model, named_params, optimizer, lr, config, rank, world, optimizer)


def _zero_run(rank: int, world: int, config: dict[str, Any], consolidate: bool) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = torch.nn.parallel.DistributedDataParallel(_model(config["dtype"]))
    lr = _LearningRate(config)
    optimizer = ZeroRedundancyOptimizer(larsopt.param_groups(model.module, exclude=config["exclude"]),
                                        optimizer_class=larsopt.LARS, **_lars_arguments(config, lr))
    lr.attach(optimizer)
    named_params = list(model.module.named_parameters())
    trajectory = _model_trajectory(model, named_params, optimizer, lr, config, rank, world, None)
    result: dict[str, Any] = dict(trajectory=trajectory)
    if consolidate:
        optimizer.consolidate_state_dict(to=0)
        if rank == 0:
            result["state_dict"] = optimizer.state_dict()
    return result


def _each_config(run: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """``run(config)`` for every config: its result, or its traceback."""
    results = {}
    for label, config in CONFIGS.items():
        try:
            results[label] = run(config)
        except Exception:  # (reported by the test of that config)
            results[label] = traceback.format_exc()
    return results


def _two_processes(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    last = list(CONFIGS)[-1]
    return {
        "fsdp2": _each_config(lambda config: _fsdp_run(rank, world, mesh, config)),
        "tensor parallel 1-D": _each_config(lambda config: _tensor_parallel_run(mesh, TENSOR_PARALLEL_1D, config)),
        "ddp": _each_config(lambda config: _ddp_run(rank, world, config)),
        "zero": _each_config(lambda config: _zero_run(rank, world, config, consolidate=config is CONFIGS[last])),
    }


def _three_processes(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {"fsdp2": _each_config(lambda config: _fsdp_run(rank, world, mesh, config))}


def _four_processes(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    tensor_parallel_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("first", "second"))
    return {
        "hsdp": _each_config(lambda config: _fsdp_run(rank, world, hsdp_mesh, config)),
        "tensor parallel 2-D": _each_config(
            lambda config: _tensor_parallel_run(tensor_parallel_mesh, TENSOR_PARALLEL_2D, config)),
    }


@pytest.fixture(scope="module")
def two_processes() -> list[dict[str, Any]]:
    return run_processes(2, _two_processes)


@pytest.fixture(scope="module")
def three_processes() -> list[dict[str, Any]]:
    return run_processes(3, _three_processes)


@pytest.fixture(scope="module")
def four_processes() -> list[dict[str, Any]]:
    return run_processes(4, _four_processes)


# --------------------------------------------------------------------------------------------------
# Comparisons


def _assert_steps_close(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]],
                        tolerance: float, ulps: float, what: str) -> None:
    """Each step's tensors within ``tolerance`` of the update so far (the largest change of the
    tensor since the start in the single-process run) plus ``ulps`` relative."""
    assert len(got) == len(want), f"{what}: {len(got)} snapshots, expected {len(want)}"
    for step in range(1, len(want)):
        assert got[step].keys() == want[step].keys(), f"{what} after step {step}: {sorted(got[step])}"
        for name, expected in want[step].items():
            actual = got[step][name]
            assert actual.shape == expected.shape, f"{what} {name!r}: shape {tuple(actual.shape)}"
            update = (expected.double() - want[0][name].double()).abs().max().item()
            error = (actual.double() - expected.double()).abs() - ulps * expected.double().abs()
            assert error.max().item() <= tolerance * update, (
                f"{what} {name!r} after step {step}: off by {error.max().item():.3g}, "
                f"update {update:.3g}")


def _assert_trajectory_matches(result: list[dict], expected: list[dict], config: dict[str, Any],
                               masters: bool) -> None:
    if config["dtype"] == torch.float64:
        _assert_steps_close([s["params"] for s in result], [s["params"] for s in expected], FLOAT64_TOLERANCE, 0.0,
                            "param")
        return
    # (the first snapshot is the params before any step; masters start as those params)
    masters_want = [expected[0]["params"]] + [s["masters"] for s in expected[1:]]
    masters_got = [result[0]["params"]] + [s["masters"] for s in result[1:]]
    if masters:
        _assert_steps_close(masters_got, masters_want, BF16_TOLERANCE, 0.0, "master")
    _assert_steps_close([s["params"] for s in result], [s["params"] for s in expected], BF16_TOLERANCE, BF16_ULP,
                        "param")


def _check_every_rank(results: list[dict[str, Any]], front_end: str, label: str) -> None:
    """Every rank's run of ``label`` under ``front_end`` against one process; the masters too
    except under ZeRO (where each rank keeps those of its own params)."""
    runs = [result[front_end][label] for result in results]
    for rank, run in enumerate(runs):
        if isinstance(run, str):
            pytest.fail(f"rank {rank} raised:\n{run}")
    if front_end == "zero":
        runs = [run["trajectory"] for run in runs]
    expected = _expected(front_end, label, runs[0])
    for rank, run in enumerate(runs):
        try:
            _assert_trajectory_matches(run, expected, CONFIGS[label], masters=front_end != "zero")
        except AssertionError as error:
            raise AssertionError(f"rank {rank}: {error}") from None


# --------------------------------------------------------------------------------------------------
# 1. Trajectories equal to single-process LARS


@pytest.mark.parametrize("label", CONFIGS)
def test_fsdp2_on_two_processes_steps_like_one_process(two_processes, label):
    _check_every_rank(two_processes, "fsdp2", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_fsdp2_on_three_processes_with_an_empty_shard_steps_like_one_process(three_processes, label):
    _check_every_rank(three_processes, "fsdp2", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_hsdp_on_a_two_by_two_mesh_steps_like_one_process(four_processes, label):
    _check_every_rank(four_processes, "hsdp", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_tensor_parallel_dtensors_step_like_one_process(two_processes, label):
    _check_every_rank(two_processes, "tensor parallel 1-D", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_tensor_parallel_dtensors_on_a_two_by_two_mesh_step_like_one_process(four_processes, label):
    _check_every_rank(four_processes, "tensor parallel 2-D", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_ddp_steps_like_one_process(two_processes, label):
    _check_every_rank(two_processes, "ddp", label)


@pytest.mark.parametrize("label", CONFIGS)
def test_zero_redundancy_optimizer_of_lars_steps_like_one_process(two_processes, label):
    _check_every_rank(two_processes, "zero", label)
