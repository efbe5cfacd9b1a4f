"""Issue 15, the kernel's and the core's corners: a broken or unwritable kernel cache, CXX with
arguments, fork, huge and overflowing norms, autograd and function transforms around
``functional.lars``. (The optimizer's: tests/test_hardening_optimizer.py.)"""

from __future__ import annotations

import copy
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import larsopt
import larsopt.functional as F
from larsopt._impl import fused_cpu, norms
from random_params import random_params, set_random_grads

IMPLS = ("reference", "foreach", "fused")
needs_kernel = pytest.mark.skipif(fused_cpu.load() is None, reason=f"no C++ kernel: {fused_cpu.unavailable_reason()}")


# 2 and 14. the kernel cache -----------------------------------------------------------------

_STEP_CODE = """
import warnings, torch, larsopt
from larsopt._impl import fused_cpu
warnings.simplefilter("error")
params = [torch.nn.Parameter(torch.randn(1000))]
params[0].grad = torch.randn(1000)
larsopt.LARS(params, lr=0.1, momentum=0.9).step()
print(fused_cpu.load() is not None)
"""


def _run_step(environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _STEP_CODE], env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=300)


def _libraries(folder: Path) -> list[Path]:
    return sorted(folder.glob("lars_cpu_*.so"))


@needs_kernel
def test_a_truncated_or_garbage_cached_library_is_rebuilt_not_loaded(tmp_path):
    environment = {"XDG_CACHE_HOME": str(tmp_path)}
    first = _run_step(environment)
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr
    [library] = _libraries(tmp_path / "larsopt")
    whole = library.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", b"\0" * len(whole)):
        library.write_bytes(broken)  # an interrupted copy: the record says otherwise
        run = _run_step(environment)
        assert run.returncode == 0, run.stderr  # no SIGBUS, no warning
        assert run.stdout.strip() == "True"
        assert fused_cpu._verified(library) and len(library.read_bytes()) == len(whole)
    fused_cpu._record(library).unlink()  # a library without its record (older cache): rebuilt too
    run = _run_step(environment)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    assert fused_cpu._verified(library)


def _fake_builds(monkeypatch, built: list[Path]) -> None:
    """Builds that copy this process's verified library instead of compiling."""
    good = fused_cpu._build(fused_cpu._compiler(), fused_cpu._SOURCE.read_bytes())

    def build_into(directory: Path, name: str, compiler: list[str]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(good.read_bytes())
        fused_cpu._record(directory / name).write_text(fused_cpu._digest(good.read_bytes()))
        built.append(directory / name)
        return directory / name

    monkeypatch.setattr(fused_cpu, "_build_into", build_into)


@needs_kernel
def test_without_a_home_the_kernel_goes_to_a_private_temporary_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no password entry either
    monkeypatch.setattr(fused_cpu.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    built: list[Path] = []
    _fake_builds(monkeypatch, built)
    assert fused_cpu._home_cache() is None
    library = fused_cpu._build(fused_cpu._compiler(), b"source")
    assert library.parent.parent == tmp_path / "tmp" and built == [library]
    assert not (tmp_path / "~").exists()
    assert library.parent.stat().st_mode & 0o077 == 0
    assert fused_cpu._build(fused_cpu._compiler(), b"source") == library and len(built) == 1  # cached


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_private_one(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")  # unwritable for root too: nothing can be created under a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    monkeypatch.setattr(fused_cpu.tempfile, "tempdir", str(tmp_path))
    built: list[Path] = []
    _fake_builds(monkeypatch, built)
    library = fused_cpu._build(fused_cpu._compiler(), b"source")
    assert library.parent == tmp_path / f"larsopt-{os.getuid()}" and fused_cpu._verified(library)


def test_cxx_is_split_like_a_shell(monkeypatch):
    monkeypatch.setenv("CXX", "env 'LC_ALL=C' g++")
    assert fused_cpu._compiler() == ["env", "LC_ALL=C", "g++"]
    monkeypatch.setenv("CXX", "no-such-compiler-4711 -O2")
    with pytest.raises(RuntimeError, match="no-such-compiler-4711"):
        fused_cpu._compiler()


@needs_kernel
def test_cxx_with_arguments_builds_the_kernel(tmp_path):
    run = _run_step({"XDG_CACHE_HOME": str(tmp_path), "CXX": "env LC_ALL=C g++"})
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr


def test_an_unavailable_kernel_warns_once_with_the_reason(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_library", None)
    monkeypatch.setattr(fused_cpu, "_library_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler-4711")
    with pytest.warns(UserWarning, match="unavailable.*no-such-compiler-4711"):
        assert fused_cpu.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_cpu.load() is None
    params = random_params()
    set_random_grads(params, 0)
    want = [p.detach().clone() for p in params]
    F.lars(want, [p.grad for p in params], [None] * 3, lr=0.1, momentum=0.9, impl="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        larsopt.LARS(params, lr=0.1, momentum=0.9).step()  # the foreach path, same numbers
    for got, expected in zip(params, want):
        torch.testing.assert_close(got, expected)


# 3. fork ------------------------------------------------------------------------------------

def _stepped_model():
    """A model after one step on two threads (OpenMP's thread pool started), its next gradients
    and the weights the next step must give (computed here, before any fork)."""
    params = random_params() + [torch.nn.Parameter(torch.randn(1 << 20))]
    optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    set_random_grads(params, 0)
    optimizer.step()
    twin = larsopt.LARS([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1, momentum=0.9,
                        weight_decay=1e-4)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # (a state_dict holds the live tensors)
    set_random_grads(params, 1)
    set_random_grads(twin.param_groups[0]["params"], 1)
    twin.step()
    return optimizer, [p.detach() for p in twin.param_groups[0]["params"]]


def _child_step(optimizer, want) -> None:
    optimizer.step()
    # (torch's own parallel ops wait forever in such a child: compare on one thread)
    torch.set_num_threads(1)
    # (the child sums on one thread, the parent on two: the last bits of a norm may differ)
    same = all(torch.allclose(p, w, rtol=1e-5, atol=1e-7) for p, w in zip(optimizer.param_groups[0]["params"], want))
    os._exit(0 if same else 1)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _wait(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_steps(two_threads):
    optimizer, want = _stepped_model()
    pid = os.fork()
    if pid == 0:
        _child_step(optimizer, want)
    assert _wait(pid, 60) == 0  # None: the child hung


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_multiprocessing_fork_child_steps(two_threads):
    optimizer, want = _stepped_model()
    process = multiprocessing.get_context("fork").Process(target=_child_step, args=(optimizer, want))
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail("the forked child hung in its step")
    assert process.exitcode == 0


_FORK_THREADS_CODE = """
import os, torch, larsopt
from larsopt._impl import fused_cpu
torch.set_num_threads(2)
torch.zeros(1 << 22).add_(1)  # a parallel torch op: torch's libgomp starts its workers
def forked_threads():
    pid = os.fork()
    if pid == 0:
        os._exit(fused_cpu._threads())
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(forked_threads())
small = [torch.nn.Parameter(torch.randn(100))]
small[0].grad = torch.randn(100)
larsopt.LARS(small, lr=0.1).step()
larsopt.LARS(small, lr=0.1, impl="reference").step()  # (its norms come from the kernel too)
print(forked_threads())
big = [torch.nn.Parameter(torch.randn(1 << 20))]
big[0].grad = torch.randn(1 << 20)
larsopt.LARS(big, lr=0.1).step()
print(forked_threads())
"""


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_run_the_kernel_on_one_thread():
    """Any forked child: the OpenMP pool is torch's own libgomp, which the parent's torch ops may
    have started as well as the kernel (the child would wait for its missing workers forever)."""
    run = subprocess.run([sys.executable, "-c", _FORK_THREADS_CODE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "1", "1"]


# 6 and 7. accurate and finite norms ---------------------------------------------------------

def _exact_norm(tensor: torch.Tensor) -> float:
    return tensor.double().square().sum().sqrt().item()


def _stats(impl: str, weights, grads, **options) -> torch.Tensor:
    stats = torch.empty(len(weights), 3)
    params = [w.clone() for w in weights]
    F.lars(params, grads, [None] * len(params), stats=stats, impl=impl, **options)
    return stats


def test_norms_of_tens_of_millions_of_values_are_accurate_on_every_path():
    generator = torch.Generator().manual_seed(0)
    n = 30_000_000  # torch's float32 CPU norm is about 0.2% off here
    weight = torch.randn(n, generator=generator) + 1.0
    grad = torch.randn(n, generator=generator) * 1e-3 + 1e-3
    w_norm, g_norm = _exact_norm(weight), _exact_norm(grad)
    lam = 0.001 * w_norm / (g_norm + 1e-8)
    for impl in IMPLS:
        stats = _stats(impl, [weight], [grad], lr=0.1, momentum=0.9)
        assert abs(stats[0, 0].item() - w_norm) / w_norm < 1e-6, impl
        assert abs(stats[0, 1].item() - g_norm) / g_norm < 1e-6, impl
        assert abs(stats[0, 2].item() - lam) / lam < 1e-6, impl
    del grad
    for dtype in (torch.bfloat16, torch.float16):  # what multi_precision and norm_source="param" read
        low = weight.to(dtype)
        assert abs(norms.sums_of_squares([low]).sqrt().item() - _exact_norm(low)) / _exact_norm(low) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1000, 1 << 21])  # the kernel's whole and shared-tensor loops
def test_a_finite_gradient_whose_squares_overflow_float32_gets_its_true_ratio(impl, dtype, numel):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(numel, generator=generator).to(dtype)
    grad = (torch.randn(numel, generator=generator) * 1e20).to(dtype)
    assert torch.isinf(grad.float().square().sum())  # float32's sum of squares overflows
    stats = _stats(impl, [weight], [grad], lr=1.0, weight_decay=1e-4)
    lam = 0.001 * _exact_norm(weight) / (_exact_norm(grad) + 1e-4 * _exact_norm(weight) + 1e-8)
    assert 0 < lam < 1e-20
    assert torch.isfinite(stats).all()
    assert abs(stats[0, 2].item() - lam) / lam < 1e-3, (impl, stats[0, 2].item(), lam)
    params = [weight.clone()]
    F.lars(params, [grad], [None], lr=1.0, weight_decay=1e-4, impl=impl)
    assert (params[0].float() - weight.float()).abs().max() < 1e-2  # a tiny step, not one to 1e19


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_weights_keep_their_norm(impl):
    weight = torch.full((5000,), 1e-25)  # squares below float32's smallest subnormal
    grad = torch.full((5000,), 1e-3)
    stats = _stats(impl, [weight], [grad], lr=0.1)
    torch.testing.assert_close(stats[0, 0].double(), torch.tensor(_exact_norm(weight), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert stats[0, 2].item() < 1e-20  # eta * |w| / |g|, not the zero-norm fallback 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_real_inf_or_nan_still_falls_back(impl, bad):
    weight = torch.randn(5000)
    grad = torch.randn(5000)
    grad[17] = bad
    assert _stats(impl, [weight], [grad], lr=0.1)[0, 2].item() == 1.0


# 8. functional.lars under autograd and transforms -------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("short", ["grads", "momentum_buffers", "master_params"])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_lists_of_other_lengths_than_params_are_refused_with_nothing_changed(impl, short, grad_mode):
    """The kernel takes one pointer per param from each list: a short list must never reach it."""
    params = [torch.ones(4), torch.ones(4)]
    lists = {"grads": [torch.ones(4), torch.ones(4)], "momentum_buffers": [None, None], "master_params": [None, None]}
    lists[short] = lists[short][:1]
    with torch.set_grad_enabled(grad_mode), pytest.raises(ValueError, match=f"2 params and 1 {short}"):
        F.lars(params, lists["grads"], lists["momentum_buffers"], lr=0.1, momentum=0.9,
               master_params=lists["master_params"], impl=impl)
    assert all(torch.equal(param, torch.ones(4)) for param in params)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_leaf_that_requires_grad_raises_torch_s_error_in_grad_mode(impl):
    weight = torch.randn(4, 5, requires_grad=True)
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.lars([weight], [torch.randn(4, 5)], [None], lr=0.1, momentum=0.9, impl=impl)
    assert torch.equal(weight.detach(), before)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_non_leaf_is_updated_where_autograd_sees_it(impl):
    leaf = torch.ones(4, 5, requires_grad=True)
    weight = leaf * 2
    made_by = weight.grad_fn
    F.lars([weight], [torch.full((4, 5), 0.5)], [None], lr=0.1, momentum=0.9, weight_decay=0.1, impl=impl)
    want = (leaf * 2).detach()
    F.lars([want], [torch.full((4, 5), 0.5)], [None], lr=0.1, momentum=0.9, weight_decay=0.1, impl="reference")
    torch.testing.assert_close(weight.detach(), want)
    assert weight.grad_fn is not made_by  # the update is in the graph, not written behind autograd


@pytest.mark.parametrize("impl", IMPLS)
def test_every_impl_runs_under_vmap(impl):
    def step(weight, grad):
        weight = weight.clone()
        buffers = [torch.zeros_like(weight)]
        F.lars([weight], [grad], buffers, lr=0.1, momentum=0.9, weight_decay=1e-4, impl=impl)
        return weight

    weights, grads = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    want = torch.stack([step(w, g) for w, g in zip(weights, grads)])
    torch.testing.assert_close(torch.vmap(step)(weights, grads), want)


