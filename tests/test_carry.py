"""carry_weight_norms: the fused kernel's |w|^2 carried from one step's update to the next step's
norms gives the same bits as taking them again, and every write to a param that bumps its
version counter or moves its memory drops the carried value. The fused step itself gives the same
bits on one thread and on two (its sums are added in a fixed order)."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import larsopt
from larsopt import functional as F
from larsopt._impl import fused_cpu

pytestmark = pytest.mark.skipif(fused_cpu.load() is None, reason=f"no C++ kernel: {fused_cpu.unavailable_reason()}")

# Two tensors shared by the kernel's threads (2**21 elements and more, larsopt_shared_min_numel()),
# two taken whole, all four carried (2**17 and more; partial last chunks and blocks), and one too
# small to carry.
SHAPES = [((1 << 21) + 4_099,), (1450, 1451), (150_001,), (512, 300), (33, 7)]
CARRIED = {0, 1, 2, 3}


def _params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def _set_grads(*param_lists, seed):
    generator = torch.Generator().manual_seed(seed)
    for params in zip(*param_lists):
        grad = torch.randn(params[0].shape, generator=generator).to(params[0].dtype)
        for param in params:
            param.grad = grad.clone()


def _pair(dtype=torch.float32, **options):
    """Two optimizers over equal params: without and with carry_weight_norms."""
    plain, carried = _params(dtype), _params(dtype)
    options = {**dict(lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.01), **options}
    return plain, larsopt.LARS(plain, **options), carried, larsopt.LARS(carried, carry_weight_norms=True, **options)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _steps(plain, plain_opt, carried, carried_opt, steps, seed=0):
    for step in range(steps):
        _set_grads(plain, carried, seed=seed + step)
        plain_opt.step()
        carried_opt.step()


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    torch.set_num_threads(request.param)  # (conftest restores the count)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(momentum_form="torch", nesterov=True), dict(trust_norm="update"),
                                     dict(trust_norm="update", weight_decay=0.0), dict(momentum=0.0, maximize=True),
                                     dict(trust_clip=True, rescale_grad=0.5)], ids=str)
def test_carried_norms_give_the_same_bits(dtype, options, threads):
    plain, plain_opt, carried, carried_opt = _pair(dtype, **options)
    _steps(plain, plain_opt, carried, carried_opt, 4)
    assert _equal(plain, carried)
    assert _equal([plain_opt.state[p].get("momentum_buffer") for p in plain if p in plain_opt.state],
                  [carried_opt.state[p].get("momentum_buffer") for p in carried if p in carried_opt.state])


def test_only_large_tensors_are_carried(threads):
    _, _, carried, carried_opt = _pair()
    _steps(*_pair()[:2], carried, carried_opt, 1)
    minimum, shared = fused_cpu.load().larsopt_carry_min_numel(), fused_cpu.load().larsopt_shared_min_numel()
    assert [p.numel() >= shared for p in carried] == [True, True, False, False, False]  # both kernel loops
    entries = carried_opt._carried_weight_norms._entries
    assert {i for i, p in enumerate(carried) if p in entries} == {i for i, p in enumerate(carried)
                                                                   if p.numel() >= minimum} == CARRIED
    for param in carried[:len(CARRIED)]:  # the carried value is |w|^2 of the weights as written (float blocks: ~1e-10)
        assert entries[param][0] == pytest.approx(param.double().square().sum().item(), rel=1e-8)


def _write_detectably(kind: str, params: list[torch.nn.Parameter], index: int) -> None:
    param = params[index]
    with torch.no_grad():
        if kind == "in-place under no_grad":
            param.mul_(1.5)
        elif kind == "detach().add_()":
            param.detach().add_(0.25)
        elif kind == "a view":
            param.view(-1)[:1000].fill_(3.0)
        elif kind == "nn.init":
            torch.nn.init.constant_(param, 0.3)
        elif kind == "module load_state_dict":
            holder = torch.nn.Module()
            holder.weight = param
            holder.load_state_dict({"weight": torch.full_like(param, 0.5)})
        elif kind == "p.data = other":
            param.data = param.data * 2.0
        elif kind == "p.data = a narrower view":  # (same storage, pointer and version: the size tells)
            param.data = param.data.view(-1)[: param.numel() // 2 + 1]
        elif kind == "p.data = other, twice":  # (the second tensor may land where the first was)
            param.data = param.data * 2.0
            param.data = param.data + 1.0
        else:
            raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["in-place under no_grad", "detach().add_()", "a view", "nn.init",
                                  "module load_state_dict", "p.data = other", "p.data = a narrower view",
                                  "p.data = other, twice"])
@pytest.mark.parametrize("index", [0, 2], ids=["shared", "whole"])
def test_writes_between_steps_are_detected(kind, index, threads):
    # (a param that changes size cannot keep its momentum buffer)
    plain, plain_opt, carried, carried_opt = _pair(**({"momentum": 0.0} if "narrower" in kind else {}))
    _steps(plain, plain_opt, carried, carried_opt, 2)
    _write_detectably(kind, plain, index)
    _write_detectably(kind, carried, index)
    _steps(plain, plain_opt, carried, carried_opt, 2, seed=10)
    assert _equal(plain, carried)


def test_a_write_through_p_data_is_not_seen():
    """The documented limit: an in-place op on ``p.data`` bypasses the version counter, so the
    next step takes the old |w| (which is why carry_weight_norms is opt-in)."""
    plain, plain_opt, carried, carried_opt = _pair()
    _steps(plain, plain_opt, carried, carried_opt, 1)
    plain[0].data.mul_(2.0)
    carried[0].data.mul_(2.0)
    _steps(plain, plain_opt, carried, carried_opt, 1, seed=5)
    assert torch.equal(plain[1], carried[1]) and not torch.equal(plain[0], carried[0])


def test_another_impl_writing_in_between_is_detected():
    plain, plain_opt, carried, carried_opt = _pair()
    _steps(plain, plain_opt, carried, carried_opt, 1)
    for optimizer in (plain_opt, carried_opt):
        optimizer.param_groups[0]["impl"] = "foreach"
    _steps(plain, plain_opt, carried, carried_opt, 1, seed=3)
    for optimizer in (plain_opt, carried_opt):
        optimizer.param_groups[0]["impl"] = "fused"
    _steps(plain, plain_opt, carried, carried_opt, 2, seed=4)
    assert _equal(plain, carried)


def test_an_amp_skipped_step_keeps_the_carried_norms():
    plain, plain_opt, carried, carried_opt = _pair()
    _steps(plain, plain_opt, carried, carried_opt, 1)
    before = [p.clone() for p in carried]
    for optimizer in (plain_opt, carried_opt):
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    _steps(plain, plain_opt, carried, carried_opt, 1, seed=7)
    assert _equal(before, carried)
    entries = carried_opt._carried_weight_norms._entries
    assert all(entries[p][1] == p._version for p in carried[:len(CARRIED)])  # still valid after the skipped step
    for optimizer in (plain_opt, carried_opt):
        optimizer.found_inf = torch.tensor(0.0)
    _steps(plain, plain_opt, carried, carried_opt, 2, seed=8)
    assert _equal(plain, carried)


def test_load_state_dict_copy_and_pickle(tmp_path):
    plain, plain_opt, carried, carried_opt = _pair()
    _steps(plain, plain_opt, carried, carried_opt, 2)
    carried_opt.load_state_dict(carried_opt.state_dict())
    assert len(carried_opt._carried_weight_norms._entries) == 0
    assert carried_opt.param_groups[0]["carry_weight_norms"] is True
    assert "carry" not in str(carried_opt.state_dict()["state"])  # carried norms are never saved
    twin = copy.deepcopy(carried_opt)
    assert twin.param_groups[0]["carry_weight_norms"] and len(twin._carried_weight_norms._entries) == 0
    restored = pickle.loads(pickle.dumps(carried_opt))
    assert restored.param_groups[0]["carry_weight_norms"]
    _steps(plain, plain_opt, carried, carried_opt, 2, seed=20)
    assert _equal(plain, carried)


def test_a_bad_setting_or_carry_is_refused():
    with pytest.raises(ValueError, match="carry_weight_norms"):
        larsopt.LARS(_params(), carry_weight_norms="yes")
    params = _params()
    _set_grads(params, seed=0)
    with pytest.raises(ValueError, match="Invalid carry"):
        F.lars(params, [p.grad for p in params], [None] * len(params), lr=0.1, carry={})


@pytest.mark.parametrize("carry", [False, True])
def test_every_thread_count_gives_the_same_bits(carry):
    """The kernel's sums are added in a fixed order (lanes, blocks, chunks), whatever the threads
    and the schedule: the step is bit-reproducible across thread counts, 40 included (more threads
    than the 33-chunk shared tensors have chunks: threads that sum no chunk of them, as on a large server)."""
    results = []
    for threads in (1, 2, 5, 40):
        torch.set_num_threads(threads)
        params = _params()
        optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.01, telemetry=True,
                                 carry_weight_norms=carry)
        for step in range(3):
            _set_grads(params, seed=step)
            optimizer.step()
        results.append(params)
    assert all(_equal(results[0], other) for other in results[1:])


_STEAL_CODE = """
import sys, torch, larsopt
torch.set_num_threads(2)
sys.path.insert(0, {tests!r})
from test_carry import _params, _set_grads
params = _params()
optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.01, carry_weight_norms=True)
for step in range(3):
    _set_grads(params, seed=step)
    optimizer.step()
torch.save([p.detach() for p in params], sys.argv[1])
"""


def test_a_team_smaller_than_the_threads_asked_for_does_all_the_work(tmp_path):
    """With OMP_THREAD_LIMIT=1 the kernel asks for two threads and gets one: that thread sums and
    updates every chunk (the schedule never waits for a thread that does not come), with the bits
    of a one-thread step."""
    code = _STEAL_CODE.format(tests=str(Path(__file__).parent))
    for limit, out in (("1", tmp_path / "limited.pt"), ("", tmp_path / "free.pt")):
        env = {key: value for key, value in os.environ.items() if key != "OMP_THREAD_LIMIT"}
        if limit:
            env["OMP_THREAD_LIMIT"] = limit
        run = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
    assert _equal(torch.load(tmp_path / "limited.pt"), torch.load(tmp_path / "free.pt"))
