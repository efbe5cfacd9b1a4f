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
from torch.utils._python_dispatch import TorchDispatchMode

import larsopt
from distributed_utils import run_processes
from host_sync import ConversionCounter

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
#: ulp (2**-7 relative at most) on top. (Against one process stepped with the run's own gradients
#: where those come from a bfloat16 model: see _expected.)
BF16_TOLERANCE = 1e-4
BF16_ULP = 2.0 ** -7

#: Tensor-parallel params on a 1-D mesh of 2: name, full shape, placements, and which is zero in
#: the last half of dim 0: the initial param or every gradient (so that a rank's local |w| or |g|
#: is 0 while the tensor's is not: the zero-norm fallback must not apply). Uneven splits (5 rows,
#: 5 columns over 2) and an empty shard (1 row over 2).
TENSOR_PARALLEL_1D = (
    ("col.weight", (5, 4), "S0", ""),
    ("col.bias", (5,), "S0", ""),
    ("row.weight", (3, 5), "S1", ""),
    ("row.bias", (3,), "R", ""),
    ("head.weight", (1, 3), "S0", ""),
    ("zero_rows.weight", (4, 3), "S0", "param"),
    ("zero_grad_rows.weight", (4, 3), "S0", "grad"),
)
#: On a 2 x 2 mesh: sharded on both mesh dims (each dim a different tensor dim, or both the same),
#: on one (the other replicating), on none; an uneven split, an empty shard, zero local shards.
TENSOR_PARALLEL_2D = (
    ("a.weight", (6, 5), "S0 S1", ""),
    ("a.bias", (6,), "S0 R", ""),
    ("b.weight", (4, 6), "R S0", ""),
    ("b.bias", (4,), "R R", ""),
    ("c.weight", (8, 3), "S0 S0", ""),
    ("d.weight", (1, 4), "R S0", ""),
    ("zero_rows.weight", (4, 2), "S0 R", "param"),
    ("zero_grad_rows.weight", (2, 4), "R S0", "grad"),
)


# --------------------------------------------------------------------------------------------------
# Configurations


#: The trust norm and nesterov of each impl's "paper" config; its "torch" config takes the other
#: values. Over the six, each pair of momentum form, trust norm and nesterov takes all four value
#: pairs, and each impl takes both values of each.
PAPER_CONFIG_SETTINGS = {"auto": ("sum", False), "foreach": ("update", True), "reference": ("sum", True)}


def _configs() -> dict[str, dict[str, Any]]:
    """Two float64 configs per impl (PAPER_CONFIG_SETTINGS), lr as a tensor or from an LR scheduler
    and the two exclusion rules (``lars=False`` groups without or with weight decay) alternating;
    then bfloat16 params with masters once per impl."""
    configs = {}
    for impl, (paper_norm, paper_nesterov) in PAPER_CONFIG_SETTINGS.items():
        for form in ("paper", "torch"):
            norm = paper_norm if form == "paper" else {"sum": "update", "update": "sum"}[paper_norm]
            nesterov = paper_nesterov == (form == "paper")
            configs[f"{impl}-{form}-{norm}{'-nesterov' if nesterov else ''}"] = dict(
                impl=impl, momentum_form=form, trust_norm=norm, nesterov=nesterov, dtype=torch.float64,
                multi_precision=False, lr_source="tensor" if form == "torch" else "scheduler",
                exclude="mxnet" if nesterov else "ndim")
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


#: The config whose ZeRO state is consolidated on rank 0 and compared with one process's.
ZERO_CONSOLIDATED = "auto-torch-update-nesterov"


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


def _layout_param(layout: tuple, number: int, dtype: torch.dtype) -> torch.Tensor:
    _, shape, _, zero = layout[number]
    tensor = _initial_tensor(number, shape, dtype)
    if zero == "param":
        tensor[len(tensor) // 2:] = 0
    return tensor


def _layout_grad(layout: tuple, step: int, number: int, dtype: torch.dtype) -> torch.Tensor:
    _, shape, _, zero = layout[number]
    grad = _hand_grad(step, number, shape, dtype)
    if zero == "grad":
        grad[len(grad) // 2:] = 0
    return grad


def _placements(code: str) -> list[Any]:
    """``"S0 R"`` -> ``[Shard(0), Replicate()]``."""
    return [Replicate() if part == "R" else Shard(int(part[1:])) for part in code.split()]


# --------------------------------------------------------------------------------------------------
# Trajectories: the params, gradients and masters at each step


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _snapshot(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None,
              with_grads: bool) -> dict:
    """Full params, the full gradients they were last stepped with if ``with_grads``, and full
    masters where ``optimizer`` keeps them (a collective under sharding: every rank calls it)."""
    params = {name: _full(param) for name, param in named_params}
    grads = {name: _full(param.grad) for name, param in named_params if with_grads and param.grad is not None}
    masters = {}
    if optimizer is not None:
        for name, param in named_params:
            if "master_param" in optimizer.state.get(param, {}):
                masters[name] = _full(optimizer.state[param]["master_param"])
    return dict(params=params, grads=grads, masters=masters)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: _LearningRate, config: dict[str, Any],
           part: int, parts: int, steps: range) -> None:
    """``steps`` of the global batches' rows ``part`` of ``parts``."""
    for step in steps:
        x, y = _batch(step, config["dtype"])
        optimizer.zero_grad()
        _loss(model, _rows(x, part, parts), _rows(y, part, parts)).backward()
        lr.before_step(step)
        optimizer.step()
        lr.after_step()


def _model_trajectory(model: torch.nn.Module, named_params: list[tuple[str, torch.Tensor]],
                      optimizer: torch.optim.Optimizer, lr: _LearningRate, config: dict[str, Any],
                      part: int, parts: int, masters_from: torch.optim.Optimizer | None) -> list[dict]:
    """Steps on rows ``part`` of ``parts`` of each global batch; ``masters_from`` is the optimizer
    whose state holds the masters (``None``: not read)."""
    with_grads = _replayed(config)
    trajectory = [_snapshot(named_params, None, with_grads)]
    for step in range(STEPS):
        _train(model, optimizer, lr, config, part, parts, range(step, step + 1))
        trajectory.append(_snapshot(named_params, masters_from, with_grads))
    return trajectory


def _single_process_model_run(config: dict[str, Any]) -> tuple[list[dict], larsopt.LARS]:
    model = _model(config["dtype"])
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
    trajectory = _model_trajectory(model, list(model.named_parameters()), optimizer, lr, config, 0, 1, optimizer)
    return trajectory, optimizer


def _tensor_trajectory(named_params: list[tuple[str, torch.Tensor]], config: dict[str, Any],
                       grad: Callable[[int, int, torch.Tensor], torch.Tensor]) -> tuple[list[dict], larsopt.LARS]:
    """Steps with ``grad(step, number, param)`` set as each param's gradient."""
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(named_params, exclude=config["exclude"]), config, lr)
    trajectory = [_snapshot(named_params, None, with_grads=False)]
    for step in range(STEPS):
        for number, (_, param) in enumerate(named_params):
            param.grad = grad(step, number, param)
        lr.before_step(step)
        optimizer.step()
        lr.after_step()
        trajectory.append(_snapshot(named_params, optimizer, with_grads=False))
    return trajectory, optimizer


def _single_process_tensor_trajectory(layout: tuple, config: dict[str, Any]) -> list[dict]:
    named_params = [(entry[0], torch.nn.Parameter(_layout_param(layout, number, config["dtype"])))
                    for number, entry in enumerate(layout)]
    return _tensor_trajectory(named_params, config,
                              lambda step, number, param: _layout_grad(layout, step, number, param.dtype))[0]


def _single_process_replay(run: list[dict], config: dict[str, Any]) -> list[dict]:
    """Single-process LARS from a run's initial params, stepped with the run's own full gradients."""
    named_params = [(name, torch.nn.Parameter(param.clone())) for name, param in run[0]["params"].items()]
    return _tensor_trajectory(named_params, config,
                              lambda step, number, param: run[step + 1]["grads"][named_params[number][0]])[0]


@functools.cache
def _expected_with_same_batch(front_end: str, label: str) -> list[dict]:
    """Single-process LARS on the full tensors, with the same global batch (or the same hand-set
    gradients), for a front-end's run of ``CONFIGS[label]``."""
    config = CONFIGS[label]
    if front_end == "tensor parallel 1-D":
        return _single_process_tensor_trajectory(TENSOR_PARALLEL_1D, config)
    if front_end == "tensor parallel 2-D":
        return _single_process_tensor_trajectory(TENSOR_PARALLEL_2D, config)
    return _single_process_model_trajectory(label)


@functools.cache
def _single_process_model_trajectory(label: str) -> list[dict]:
    """(One for every front-end that trains the model.)"""
    return _single_process_model_run(CONFIGS[label])[0]


def _replayed(config: dict[str, Any]) -> bool:
    """Whether one process replays a model's run of ``config`` from its gradients: a bfloat16
    model's gradients depend on how the batch is split across ranks and on the precision of their
    averaging (FSDP2's reduce-scatter and DDP's all-reduce average in bfloat16)."""
    return config["dtype"] == torch.bfloat16


def _expected(front_end: str, label: str, run: list[dict]) -> list[dict]:
    """What ``run`` (rank 0's) must equal."""
    if _replayed(CONFIGS[label]) and not front_end.startswith("tensor parallel"):
        return _single_process_replay(run, CONFIGS[label])
    return _expected_with_same_batch(front_end, label)


# --------------------------------------------------------------------------------------------------
# The front-ends, on each rank


def _sharded_model(mesh: Any, dtype: torch.dtype) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype)
    for layer in model:
        if list(layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _layout(tensor: torch.Tensor) -> str:
    if isinstance(tensor, DTensor):
        return f"DTensor {tuple(tensor.shape)} on {tensor.device_mesh} placed {tuple(tensor.placements)}"
    return f"plain tensor {tuple(tensor.shape)}"


def _state_layout(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> dict:
    """Each param's layout and its state tensors' (shape, mesh, placements)."""
    return {name: {"param": _layout(param),
                   **{key: _layout(value) for key, value in optimizer.state[param].items()
                      if isinstance(value, torch.Tensor)}}
            for name, param in named_params}


def _fsdp_run(rank: int, world: int, mesh: Any, config: dict[str, Any]) -> dict[str, Any]:
    model = _sharded_model(mesh, config["dtype"])
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
    named_params = list(model.named_parameters())
    trajectory = _model_trajectory(model, named_params, optimizer, lr, config, rank, world, optimizer)
    return dict(trajectory=trajectory, state_layout=_state_layout(named_params, optimizer))


def _tensor_parallel_params(mesh: Any, layout: tuple, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    from torch.distributed.tensor import distribute_tensor

    return [(entry[0], torch.nn.Parameter(distribute_tensor(_layout_param(layout, number, dtype), mesh,
                                                            _placements(entry[2]))))
            for number, entry in enumerate(layout)]


def _tensor_parallel_grads(mesh: Any, layout: tuple) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """Hand-set gradients: DTensors placed like their param."""
    from torch.distributed.tensor import distribute_tensor

    def grad(step: int, number: int, param: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(_layout_grad(layout, step, number, param.dtype), mesh, param.placements)

    return grad


def _tensor_parallel_run(mesh: Any, layout: tuple, config: dict[str, Any]) -> dict[str, Any]:
    named_params = _tensor_parallel_params(mesh, layout, config["dtype"])
    trajectory, optimizer = _tensor_trajectory(named_params, config, _tensor_parallel_grads(mesh, layout))
    return dict(trajectory=trajectory, state_layout=_state_layout(named_params, optimizer))


def _ddp_run(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    model = torch.nn.parallel.DistributedDataParallel(_model(config["dtype"]))
    lr = _LearningRate(config)
    optimizer = _lars(larsopt.param_groups(model.module, exclude=config["exclude"]), config, lr)
    named_params = list(model.module.named_parameters())
    return dict(trajectory=_model_trajectory(model, named_params, optimizer, lr, config, rank, world, optimizer))


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
    return {
        "fsdp2": _each_config(lambda config: _fsdp_run(rank, world, mesh, config)),
        "tensor parallel 1-D": _each_config(lambda config: _tensor_parallel_run(mesh, TENSOR_PARALLEL_1D, config)),
        "ddp": _each_config(lambda config: _ddp_run(rank, world, config)),
        "zero": _each_config(
            lambda config: _zero_run(rank, world, config, consolidate=config is CONFIGS[ZERO_CONSOLIDATED])),
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


def _runs(results: list[dict[str, Any]], front_end: str, label: str) -> list[dict[str, Any]]:
    """Each rank's run of ``label`` under ``front_end``; a failure if one raised."""
    runs = [result[front_end][label] for result in results]
    for rank, run in enumerate(runs):
        if isinstance(run, str):
            pytest.fail(f"rank {rank} raised:\n{run}")
    return runs


def _check_every_rank(results: list[dict[str, Any]], front_end: str, label: str) -> None:
    """Every rank's run of ``label`` under ``front_end`` against one process; the masters too
    except under ZeRO (where each rank keeps those of its own params)."""
    runs = [run["trajectory"] for run in _runs(results, front_end, label)]
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


@pytest.mark.parametrize("front_end, processes", [("fsdp2", "two_processes"), ("hsdp", "four_processes"),
                                                  ("tensor parallel 1-D", "two_processes"),
                                                  ("tensor parallel 2-D", "four_processes")])
def test_sharded_state_is_laid_out_like_its_param(front_end, processes, request):
    """Momentum buffers and masters are DTensors on the param's mesh with its placements, as
    ``torch.distributed.checkpoint`` needs them."""
    results = request.getfixturevalue(processes)
    misplaced = []
    for label in CONFIGS:
        for rank, run in enumerate(_runs(results, front_end, label)):
            for name, layouts in run["state_layout"].items():
                misplaced += [f"{label} rank {rank} {name} {key}: {layout}, param: {layouts['param']}"
                              for key, layout in layouts.items() if layout != layouts["param"]]
    assert not misplaced, "\n".join(misplaced)


def test_zero_consolidated_state_is_one_process_state(two_processes):
    state = _runs(two_processes, "zero", ZERO_CONSOLIDATED)[0]["state_dict"]
    _, optimizer = _single_process_model_run(CONFIGS[ZERO_CONSOLIDATED])
    expected = optimizer.state_dict()
    assert state["state"].keys() == expected["state"].keys()
    for index, tensors in expected["state"].items():
        buffer = tensors["momentum_buffer"]
        torch.testing.assert_close(state["state"][index]["momentum_buffer"], buffer, rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE * buffer.abs().max().item())


# --------------------------------------------------------------------------------------------------
# 2. and 3. Collectives and host syncs inside one sharded step

#: torch.distributed's collectives (patched where they are defined, which also catches the calls
#: that torch.distributed's own modules make).
C10D_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
                    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce", "broadcast",
                    "all_to_all", "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend",
                    "irecv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list")
#: The functional collectives' Python entry points, which DTensor calls when it redistributes
#: (some inside an op, where no dispatch mode sees them).
FUNCTIONAL_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather_tensor", "all_gather_tensor_autograd",
                          "all_gather_into_tensor_coalesced", "reduce_scatter_tensor",
                          "reduce_scatter_tensor_autograd", "reduce_scatter_tensor_coalesced", "all_to_all_single",
                          "all_to_all_single_autograd", "broadcast", "permute_tensor")
#: Operator namespaces of collectives, as a dispatch mode sees them.
COLLECTIVE_OP_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d", "c10d_functional")


class _CollectiveOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVE_OP_NAMESPACES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_collectives() -> Iterator[dict[str, int]]:
    """Counts, in the dict it yields, the collectives of its block by each route they can take:
    torch.distributed calls, functional collectives, collective ops dispatched, and the gloo
    backend's own profiler events (which every collective on gloo makes, however it was issued)."""
    import torch.distributed._functional_collectives as functional
    import torch.distributed.distributed_c10d as c10d

    counts = dict.fromkeys(("torch.distributed", "functional collectives", "collective ops", "gloo events"), 0)

    def counting(route: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def counted(*args, **kwargs):
            counts[route] += 1
            return function(*args, **kwargs)
        return counted

    c10d_functions = {name: getattr(c10d, name) for name in C10D_COLLECTIVES if hasattr(c10d, name)}
    functional_functions = {name: getattr(functional, name) for name in FUNCTIONAL_COLLECTIVES
                            if hasattr(functional, name)}
    with contextlib.ExitStack() as stack:
        for module in (dist, c10d):
            for name, function in c10d_functions.items():
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, counting("torch.distributed", function)))
        for name, function in functional_functions.items():
            stack.enter_context(mock.patch.object(functional, name, counting("functional collectives", function)))
        profiler = stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        ops = stack.enter_context(_CollectiveOps())
        yield counts
    counts["collective ops"] = ops.count
    counts["gloo events"] = sum(event.name.startswith("gloo:") for event in profiler.events())


def _fsdp_model_of_size(mesh: Any, size: int) -> tuple[list[tuple[str, torch.Tensor]], Callable[[], None]]:
    """An FSDP2 model of 4 * ``size`` tensors, and a function that gives them gradients."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(2 * size)]).double()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def backward() -> None:
        model(torch.randn(3, 5, dtype=torch.float64)).square().sum().backward()

    return list(model.named_parameters()), backward


def _tensor_parallel_model_of_size(mesh: Any, size: int) -> tuple[list[tuple[str, torch.Tensor]],
                                                                    Callable[[], None]]:
    """``size`` copies of the 1-D tensor-parallel params, and a function that gives them gradients."""
    layout = tuple((f"copy{copy}.{name}", *rest) for copy in range(size) for name, *rest in TENSOR_PARALLEL_1D)
    named_params = _tensor_parallel_params(mesh, layout, torch.float64)
    grad = _tensor_parallel_grads(mesh, layout)

    def backward() -> None:
        for number, (_, param) in enumerate(named_params):
            param.grad = grad(0, number, param)

    return named_params, backward


COUNTED_MODELS = {"fsdp2": _fsdp_model_of_size, "tensor parallel": _tensor_parallel_model_of_size}


def _measure_one_step(mesh: Any, model: str, size: int, impl: str) -> dict[str, Any]:
    """After two warm-up steps: a step's collectives, the next step's conversions, and a third
    step's conversions with a GradScaler's scale and inf flag set (as ``scaler.step`` sets them).
    (Apart: under a TorchFunctionMode, torch.distributed's functions call themselves again through
    the mode, which would count each collective twice.)"""
    named_params, backward = COUNTED_MODELS[model](mesh, size)
    lr = torch.tensor(BASE_LR)
    optimizer = larsopt.LARS(larsopt.param_groups(named_params), lr=lr, impl=impl, trust_clip=True, **HYPER)
    for step in range(2):
        backward()
        lr.fill_(BASE_LR * LR_FACTORS[step])
        optimizer.step()
        optimizer.zero_grad()
    backward()
    with _count_collectives() as collectives:
        optimizer.step()
    optimizer.zero_grad()
    backward()
    with ConversionCounter() as conversions:
        optimizer.step()
    optimizer.zero_grad()
    backward()
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    with ConversionCounter() as scaled_conversions:
        optimizer.step()
    return dict(tensors=len(named_params), collectives=collectives, conversions=conversions.count,
                scaled_conversions=scaled_conversions.count)


def _one_step_measurements(rank: int, world: int) -> dict[tuple[str, int, str], Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for model, size, impl in itertools.product(COUNTED_MODELS, (1, 3), IMPLS):
        try:
            results[model, size, impl] = _measure_one_step(mesh, model, size, impl)
        except Exception:  # (reported by the tests of that model and impl)
            results[model, size, impl] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def one_step_measurements() -> list[dict[tuple[str, int, str], Any]]:
    return run_processes(2, _one_step_measurements)


def _measurements(results: list[dict], model: str, size: int, impl: str) -> list[dict[str, Any]]:
    runs = [result[model, size, impl] for result in results]
    for rank, run in enumerate(runs):
        if isinstance(run, str):
            pytest.fail(f"rank {rank} raised:\n{run}")
    return runs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", COUNTED_MODELS)
def test_collectives_per_sharded_step_do_not_grow_with_the_number_of_tensors(one_step_measurements, model, impl):
    for rank, (few, many) in enumerate(zip(_measurements(one_step_measurements, model, 1, impl),
                                           _measurements(one_step_measurements, model, 3, impl))):
        assert many["tensors"] == 3 * few["tensors"]
        assert few["collectives"]["gloo events"] > 0, f"rank {rank}: no collective at all: {few['collectives']}"
        assert few["collectives"] == many["collectives"], (
            f"rank {rank}: {few['tensors']} tensors: {few['collectives']}; "
            f"{many['tensors']} tensors: {many['collectives']}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", COUNTED_MODELS)
def test_sharded_step_never_syncs_with_the_host(one_step_measurements, model, impl):
    for size in (1, 3):
        for rank, run in enumerate(_measurements(one_step_measurements, model, size, impl)):
            assert run["conversions"] == 0, f"rank {rank}, {run['tensors']} tensors"
            assert run["scaled_conversions"] == 0, f"rank {rank}, {run['tensors']} tensors, with GradScaler state"


# --------------------------------------------------------------------------------------------------
# 4. FSDP2 + torch.distributed.checkpoint: save, load in fresh processes, continue

#: Saved after this many steps, of STEPS. The configs take lr as a tensor set at every step, so no
#: scheduler state needs checkpointing; the torch momentum form with weight decay is the one that
#: get_state_dict's state-creating step (zero grads, lr 0) leaves a trace in, which the load must
#: replace; bfloat16 adds the masters.
SAVED_AFTER = 2
CHECKPOINTED_CONFIGS = ("auto-torch-update-nesterov", "auto-bfloat16-masters")


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"param": _full(param),
                   **{key: _full(value) for key, value in optimizer.state[param].items()
                      if isinstance(value, torch.Tensor)}}
            for name, param in model.named_parameters()}


def _checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def _checkpointed_runs(rank: int, world: int, directory: str) -> dict[str, Any]:
    """STEPS steps without interruption, saving a checkpoint after SAVED_AFTER."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))

    def run(config: dict[str, Any], label: str) -> dict[str, Any]:
        model = _sharded_model(mesh, config["dtype"])
        lr = _LearningRate(config)
        optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
        _train(model, optimizer, lr, config, rank, world, range(SAVED_AFTER))
        dcp.save(_checkpoint(model, optimizer), checkpoint_id=f"{directory}/{label}")
        _train(model, optimizer, lr, config, rank, world, range(SAVED_AFTER, STEPS))
        return _full_state(model, optimizer)

    return _each_checkpointed_config(run)


def _resumed_runs(rank: int, world: int, directory: str) -> dict[str, Any]:
    """A new model and optimizer load the checkpoint and take the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))

    def run(config: dict[str, Any], label: str) -> dict[str, Any]:
        model = _sharded_model(mesh, config["dtype"])
        lr = _LearningRate(config)
        optimizer = _lars(larsopt.param_groups(model, exclude=config["exclude"]), config, lr)
        state = _checkpoint(model, optimizer)
        dcp.load(state, checkpoint_id=f"{directory}/{label}")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(model, optimizer, lr, config, rank, world, range(SAVED_AFTER, STEPS))
        return _full_state(model, optimizer)

    return _each_checkpointed_config(run)


def _each_checkpointed_config(run: Callable[[dict[str, Any], str], Any]) -> dict[str, Any]:
    results = {}
    for label in CHECKPOINTED_CONFIGS:
        try:
            results[label] = run(CONFIGS[label], label)
        except Exception:  # (reported by the test of that config)
            results[label] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def checkpointed_and_resumed(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    return run_processes(2, _checkpointed_runs, directory), run_processes(2, _resumed_runs, directory)


@pytest.mark.parametrize("label", CHECKPOINTED_CONFIGS)
def test_fsdp2_checkpoint_resumed_in_new_processes_continues_exactly(checkpointed_and_resumed, label):
    for rank, (uninterrupted, resumed) in enumerate(zip(*checkpointed_and_resumed)):
        for run, what in ((uninterrupted[label], "uninterrupted run"), (resumed[label], "resumed run")):
            if isinstance(run, str):
                pytest.fail(f"rank {rank}, {what} raised:\n{run}")
        want, got = uninterrupted[label], resumed[label]
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].keys() == want[name].keys(), f"rank {rank} {name}"
            for key, tensor in want[name].items():
                assert torch.equal(got[name][key], tensor), f"rank {rank}: {key} of {name!r} differs"


# --------------------------------------------------------------------------------------------------
# 5. Sharded input LARS cannot step: a ValueError naming the param


def _error_of(action: Callable[[], Any]) -> tuple[str, str] | None:
    try:
        action()
    except Exception as error:  # (the test checks its type)
        return type(error).__name__, str(error)
    return None


def _bad_input_errors(rank: int, world: int) -> dict[str, tuple[str, str] | None]:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))

    def sharded(on: Any, placements: list[Any]) -> torch.Tensor:
        return distribute_tensor(_initial_tensor(0, (5, 3), torch.float64), on, placements)

    partial = torch.nn.Parameter(sharded(mesh, [Shard(0)]))
    partial.grad = DTensor.from_local(_hand_grad(0, rank, (5, 3), torch.float64), mesh, [Partial()])
    misplaced = torch.nn.Parameter(sharded(mesh, [Shard(0)]))
    misplaced.grad = sharded(mesh, [Shard(1)])
    first = torch.nn.Parameter(sharded(mesh, [Shard(0)]))
    first.grad = sharded(mesh, [Shard(0)])
    second = torch.nn.Parameter(sharded(reversed_mesh, [Shard(0)]))
    second.grad = sharded(reversed_mesh, [Shard(0)])
    cases = {"partial gradient": [("encoder.weight", partial)],
             "gradient placed otherwise": [("encoder.weight", misplaced)],
             "one group on two meshes": [("first.weight", first), ("second.weight", second)]}
    return {case: _error_of(lambda: larsopt.LARS(named_params, lr=BASE_LR, momentum=0.9).step())
            for case, named_params in cases.items()}


@pytest.fixture(scope="module")
def bad_input_errors() -> list[dict[str, tuple[str, str] | None]]:
    return run_processes(2, _bad_input_errors)


@pytest.mark.parametrize("case, name", [("partial gradient", "encoder.weight"),
                                        ("gradient placed otherwise", "encoder.weight"),
                                        ("one group on two meshes", "second.weight")])
def test_bad_sharded_input_is_a_value_error_naming_the_param(bad_input_errors, case, name):
    for rank, errors in enumerate(bad_input_errors):
        assert errors[case] is not None, f"rank {rank}: no error"
        kind, message = errors[case]
        assert kind == "ValueError", f"rank {rank}: {kind}: {message}"
        assert name in message, f"rank {rank}: {message}"
