"""Every fast path of ``functional.lars`` gives the reference's numbers, never syncs, never recompiles.

Comparison metric: |dw_impl - dw_ref| / |dw_ref| per tensor, with dw = w_final - w_initial over
several steps (and the same for the momentum buffers). Hyper-parameters make the update a sizeable
fraction of |w|, so rounding w itself (one ulp) does not hide or fake a difference in the update.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest
import torch

import larsopt
from larsopt import functional as F
from larsopt._impl import fused_cpu
from host_sync import ConversionCounter
from option_registry import sweep_names_and_values

FAST_IMPLS = ("foreach", "fused")
# 1-D .. 4-D, a zero weight and a zero gradient (lam = 1 fallback).
SHAPES = [(5,), (7, 6), (4, 3, 5), (6, 3, 3, 3), (9,), (3, 4)]
# Large enough for the fused kernel's threads: two tensors shared by them (2**21 elements and more;
# partial last chunk and block), two taken whole.
LARGE_SHAPES = [((1 << 21) + 70_001,), (1450, 1451), (300, 900), (41_000,)]
ZERO_WEIGHT, ZERO_GRAD = 4, 5
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}
LRS = (0.5, 0.3, 0.45)  # a tensor lr that changes every step

OPTION_NAMES, OPTION_VALUES = sweep_names_and_values()
COMBINATIONS = [options for options in (dict(zip(OPTION_NAMES, values)) for values in itertools.product(*OPTION_VALUES))
                if not (options["nesterov"] and options["momentum"] == 0.0)]  # nesterov needs momentum


def _inputs(dtype: torch.dtype, seed: int = 0, shapes: list[tuple[int, ...]] = SHAPES):
    """(weights, grads, momentum buffers) for ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    if shapes[:len(SHAPES)] == SHAPES:
        weights[ZERO_WEIGHT].zero_()
        grads[ZERO_GRAD].zero_()
    buffers = [(0.1 * torch.randn(shape, generator=generator)).to(dtype) for shape in shapes]
    return weights, grads, buffers


def _run(impl: str, weights, grads, buffers, *, steps: int = 3, lr_values=LRS, **options):
    params = [w.clone() for w in weights]
    bufs = [b.clone() for b in buffers] if options.get("momentum", 0.0) != 0 else [None] * len(params)
    lr = torch.tensor(lr_values[0])
    for step in range(steps):
        lr.fill_(lr_values[step % len(lr_values)])
        F.lars(params, grads, bufs, lr=lr, eta=0.5, impl=impl, **options)
    return params, bufs


def _relative(result: torch.Tensor, expected: torch.Tensor, start: torch.Tensor) -> float:
    change = (expected.double() - start.double()).norm()
    difference = (result.double() - expected.double()).norm()
    return (difference / change).item() if change > 0 else difference.item()


def _assert_close(impl, dtype, got, want, weights, buffers, label):
    for i, (a, b, w) in enumerate(zip(got[0], want[0], weights)):
        assert _relative(a, b, w) <= TOLERANCE[dtype], f"{impl} {label}: weight {i} {tuple(w.shape)}"
    for i, (a, b, s) in enumerate(zip(got[1], want[1], buffers)):
        if a is not None:
            assert _relative(a, b, s) <= TOLERANCE[dtype], f"{impl} {label}: momentum {i} {tuple(s.shape)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_every_option_combination_matches_reference(dtype):
    weights, grads, buffers = _inputs(dtype)
    for options in COMBINATIONS:
        want = _run("reference", weights, grads, buffers, steps=2, **options)
        for impl in FAST_IMPLS:
            got = _run(impl, weights, grads, buffers, steps=2, **options)
            _assert_close(impl, dtype, got, want, weights, buffers, str(options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_source", ["master", "param"])
def test_master_copies_match_reference(dtype, norm_source):
    """multi_precision: the fast paths update float32 masters and write the params back rounded."""
    weights, grads, buffers = _inputs(torch.float32, seed=7)
    params = [w.to(dtype) for w in weights]
    low_grads = [g.to(dtype) for g in grads]
    runs = {}
    for impl in ("reference",) + FAST_IMPLS:
        for options in COMBINATIONS[::5]:
            masters = [w.clone() for w in weights]
            current = [p.clone() for p in params]
            bufs = [b.clone() for b in buffers] if options["momentum"] != 0 else [None] * len(params)
            lr = torch.tensor(LRS[0])
            for step in range(3):
                lr.fill_(LRS[step])
                F.lars(current, low_grads, bufs, master_params=masters, norm_source=norm_source, lr=lr, eta=0.5,
                       impl=impl, **options)
            runs[impl, str(options)] = (current, masters, bufs)
    for (impl, label), (current, masters, bufs) in runs.items():
        _, want_masters, want_bufs = runs["reference", label]
        for i, (got, want, start) in enumerate(zip(masters, want_masters, weights)):
            assert _relative(got, want, start) <= 1e-6, f"{impl} {label}: master {i}"
            assert torch.equal(current[i], got.to(dtype)), f"{impl} {label}: param {i} is not its master rounded"
        for i, (got, want, start) in enumerate(zip(bufs, want_bufs, buffers)):
            if got is not None:
                assert _relative(got, want, start) <= 1e-6, f"{impl} {label}: momentum {i}"


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("norm_source", ["master", "param"])
@pytest.mark.parametrize("amp", ["none", "scale", "skip"])
def test_master_copies_with_amp_and_mixed_dtypes(impl, norm_source, amp):
    """One call with bf16 params + float32 masters (bf16 and float32 grads), float32 params +
    float64 masters, float32 params without masters and grads of several dtypes, with and without
    a GradScaler's scale and inf flag: the reference's numbers, grads untouched, a skipped step
    leaves everything bit-identical."""
    generator = torch.Generator().manual_seed(8)
    shapes = [(6, 5), (7,), (4, 3), (5, 2), (9,), (3, 3)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    param_dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.bfloat16]
    master_dtypes = [torch.float32, torch.float32, torch.float64, None, None, torch.float32]
    grad_dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float64, torch.float32]
    scale = 1.0 if amp == "none" else 256.0
    grads = [(scale * torch.randn(shape, generator=generator)).to(dtype) for shape, dtype in zip(shapes, grad_dtypes)]
    grads_before = [g.clone() for g in grads]
    scaler = {} if amp == "none" else dict(grad_scale=torch.tensor(scale), found_inf=torch.tensor(float(amp == "skip")))
    runs = []
    for name in ("reference", impl):
        params = [w.to(dtype, copy=True) for w, dtype in zip(start, param_dtypes)]
        masters = [None if dtype is None else w.to(dtype, copy=True) for w, dtype in zip(start, master_dtypes)]
        buffers = [torch.zeros_like(w, dtype=m.dtype if m is not None else p.dtype)
                   for w, p, m in zip(start, params, masters)]
        for step in range(3):
            F.lars(params, grads, buffers, master_params=masters, norm_source=norm_source, lr=torch.tensor(0.3),
                   momentum=0.9, weight_decay=0.05, eta=0.5, trust_norm="update", impl=name, **scaler)
        runs.append((params, masters, buffers))
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_before))
    (want_params, want_masters, want_buffers), (params, masters, buffers) = runs
    for i in range(len(shapes)):
        if amp == "skip":
            assert torch.equal(params[i], start[i].to(param_dtypes[i]))
            assert torch.equal(buffers[i], torch.zeros_like(buffers[i]))
            continue
        target, want_target = (masters[i], want_masters[i]) if masters[i] is not None else (params[i], want_params[i])
        assert _relative(target, want_target, start[i]) <= 1e-6, i
        assert _relative(buffers[i], want_buffers[i], torch.zeros_like(buffers[i])) <= 1e-6, i
        if masters[i] is not None:
            assert torch.equal(params[i], masters[i].to(param_dtypes[i])), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_tensors_match_reference(dtype):
    """The fused kernel's split tensors and threads (two at least) agree with the reference."""
    weights, grads, buffers = _inputs(dtype, seed=5, shapes=LARGE_SHAPES)
    if fused_cpu.load() is not None:  # both of the kernel's loops: shared tensors and whole ones
        numels = [w.numel() for w in weights]
        assert min(numels) < fused_cpu.load().larsopt_shared_min_numel() <= max(numels)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for form, trust_norm, adapt in itertools.product(("paper", "torch"), ("sum", "update"), (True, False)):
            options = dict(momentum_form=form, trust_norm=trust_norm, adapt=adapt, momentum=0.9, weight_decay=0.1)
            want = _run("reference", weights, grads, buffers, **options)
            for impl in FAST_IMPLS:
                got = _run(impl, weights, grads, buffers, **options)
                _assert_close(impl, dtype, got, want, weights, buffers, str(options))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_float_lr_and_eps_match_reference(impl):
    weights, grads, buffers = _inputs(torch.float32, seed=1)
    options = dict(momentum=0.9, weight_decay=0.01, epsilon=0.3)
    params = [[w.clone() for w in weights] for _ in range(2)]
    bufs = [[b.clone() for b in buffers] for _ in range(2)]
    for step in range(4):
        for which, name in enumerate(("reference", impl)):
            F.lars(params[which], grads, bufs[which], lr=0.2 / (step + 1), eta=0.4, impl=name, **options)
    _assert_close(impl, torch.float32, (params[1], bufs[1]), (params[0], bufs[0]), weights, buffers, "float lr")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("skip", [False, True])
def test_grad_scale_and_found_inf(impl, skip):
    weights, grads, buffers = _inputs(torch.float32, seed=2)
    scaled = [g * 1024 for g in grads]
    amp = dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0 if skip else 0.0), momentum=0.9,
               weight_decay=0.1)
    want = _run("reference", weights, scaled, buffers, **amp)
    got = _run(impl, weights, scaled, buffers, **amp)
    if skip:
        for a, w in zip(got[0] + got[1], weights + buffers):
            assert torch.equal(a, w)
    else:
        _assert_close(impl, torch.float32, got, want, weights, buffers, "amp")


def _mixed_case():
    """Tensors each fast path must hand on (the kernel: a float64 master and a non-contiguous
    param; foreach and the kernel: a lazy sparse grad and bf16 stochastic rounding), beside
    covered ones in the same call."""
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(8, 4, generator=generator) for _ in range(5)]
    params[2] = params[2].to(torch.bfloat16)
    params[3] = torch.randn(4, 8, generator=generator).t()  # not contiguous: not for the fused kernel
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
    rows = torch.tensor([[0, 2, 2]])
    grads[4] = torch.sparse_coo_tensor(rows, torch.randn(3, 4, generator=generator), (8, 4), check_invariants=True)
    masters = [None, params[1].double(), None, None, None]
    buffers = [torch.zeros_like(p) for p in params]
    buffers[1] = torch.zeros_like(masters[1])
    return params, grads, buffers, masters


@pytest.mark.parametrize("impl", FAST_IMPLS + ("auto",))
def test_uncovered_tensors_take_the_reference(impl):
    """A float64 master, a sparse grad, stochastic rounding (bf16) and a non-contiguous param in one call."""
    results = []
    for name in ("reference", impl):
        params, grads, buffers, masters = _mixed_case()
        generator = torch.Generator().manual_seed(4)
        for step in range(3):
            F.lars(params, grads, buffers, master_params=masters, lr=torch.tensor(0.4 - 0.1 * step), momentum=0.9,
                   weight_decay=0.05, eta=0.5, stochastic_rounding=True, generator=generator, impl=name)
        results.append((params, buffers, masters))
    start = _mixed_case()
    for k, (got, want, first) in enumerate(zip(results[1][0], results[0][0], start[0])):
        tolerance = 2e-2 if got.dtype == torch.bfloat16 else 1e-6
        assert _relative(got, want, first) <= tolerance, k
    # The sparse (lazy) and stochastic-rounding tensors are the reference's own computation.
    assert torch.equal(results[1][0][2], results[0][0][2])
    assert torch.equal(results[1][0][4], results[0][0][4])
    # The float64 master of a float32 param: foreach computes it in float64.
    assert _relative(results[1][2][1], results[0][2][1], start[2][1]) <= 1e-12


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_math_dtype_takes_the_reference(impl):
    weights, grads, buffers = _inputs(torch.float32)
    want = _run("reference", weights, grads, buffers, momentum=0.9, math_dtype=torch.float64)
    got = _run(impl, weights, grads, buffers, momentum=0.9, math_dtype=torch.float64)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)


def test_fused_without_kernel_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(fused_cpu, "load", lambda: None)
    weights, grads, buffers = _inputs(torch.float32)
    want = _run("reference", weights, grads, buffers, momentum=0.9, weight_decay=0.1)
    got = _run("fused", weights, grads, buffers, momentum=0.9, weight_decay=0.1)
    _assert_close("fused (no kernel)", torch.float32, got, want, weights, buffers, "fallback")


def test_fused_does_not_write_grads_and_bumps_versions():
    weights, grads, buffers = _inputs(torch.float32)
    params, bufs = [w.clone() for w in weights], [b.clone() for b in buffers]
    grads_before = [g.clone() for g in grads]
    versions = [p._version for p in params]
    F.lars(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True, rescale_grad=2.0,
           clip_gradient=0.5, impl="fused")
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_before))
    assert all(p._version > v for p, v in zip(params, versions))


def test_auto_is_fused():
    assert F.resolve_impl("auto") == "fused"
    assert set(F.IMPLS) == {"auto", "reference", "foreach", "fused"}


@pytest.mark.parametrize("impl", ("auto",) + FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("multi_precision", [False, True])
def test_steady_state_step_has_no_host_sync(impl, dtype, multi_precision):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)).to(dtype)
    lr = torch.tensor(0.1)
    optimizer = larsopt.LARS(larsopt.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-4, trust_clip=True,
                             impl=impl, multi_precision=multi_precision)
    scaler_state = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    for step in range(3):
        model(torch.randn(4, 8).to(dtype)).square().sum().backward()
        lr.fill_(0.1 / (step + 1))
        if step == 2:
            for name, value in scaler_state.items():
                setattr(optimizer, name, value)
            with ConversionCounter() as counter:
                optimizer.step()
            assert counter.count == 0
        else:
            optimizer.step()
        optimizer.zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ("auto",) + FAST_IMPLS)
@pytest.mark.parametrize("multi_precision", [False, True])
def test_cuda_step_never_synchronises(impl, multi_precision):
    """With GradScaler, a tensor lr on the CPU and one on the GPU: no synchronising CUDA call."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)).cuda()
    if multi_precision:
        model = model.to(torch.bfloat16)
    for lr in (torch.tensor(0.1), torch.tensor(0.1, device="cuda")):
        optimizer = larsopt.LARS(larsopt.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-4,
                                 trust_clip=True, impl=impl, multi_precision=multi_precision)
        scaler = torch.amp.GradScaler("cuda")
        for step in range(3):
            loss = model(torch.randn(4, 8, device="cuda", dtype=model[0].weight.dtype)).float().square().sum()
            scaler.scale(loss).backward()
            lr.fill_(0.1 / (step + 1))
            if step == 2:
                scaler.unscale_(optimizer)  # the step then gets found_inf without grad_scale
            torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(optimizer)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            scaler.update()
            optimizer.zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_paths_match_reference(dtype):
    weights, grads, buffers = (
        [t.cuda() for t in tensors] for tensors in _inputs(dtype, seed=6, shapes=SHAPES + LARGE_SHAPES))
    for options in COMBINATIONS[::7]:
        want = _run("reference", weights, grads, buffers, steps=2, **options)
        for impl in FAST_IMPLS:
            got = _run(impl, weights, grads, buffers, steps=2, **options)
            _assert_close(impl, dtype, got, want, weights, buffers, f"cuda {options}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_no_recompile_when_lr_changes(impl):
    """Under torch.compile (the user's own), a tensor lr changing every step compiles once."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn(4, 3), torch.randn(5)]
    buffers = [torch.zeros(4, 3), torch.zeros(5)]
    lr = torch.tensor(0.1)

    @torch.compile(backend="eager")
    def step(lr: torch.Tensor) -> None:
        F.lars(params, grads, buffers, lr=lr, momentum=0.9, weight_decay=1e-4, trust_clip=True, impl=impl)

    step(lr)
    with torch.compiler.set_stance("fail_on_recompile"):
        for value in (0.05, 0.025, 0.0125, 0.3):
            lr.fill_(value)
            step(lr)
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ("auto", "foreach"))
def test_compiled_optimizer_step(impl):
    """torch.compile(fullgraph=True) of LARS.step with inductor: no graph break (the fused kernel is
    a custom op), the eager numbers, and one compile while a tensor lr changes every step."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
        lr = torch.tensor(0.1)
        optimizer = larsopt.LARS(larsopt.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-3, eta=0.02,
                                 impl=impl)
        return model, optimizer, lr

    runs = []
    for compiled in (False, True):
        model, optimizer, lr = make()
        step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
        generator = torch.Generator().manual_seed(1)
        for k in range(5):
            model(torch.randn(8, 6, generator=generator)).square().mean().backward()
            lr.fill_(0.1 / (k + 1))
            if k < 2:  # the first step creates the momentum buffers: the second one compiles again
                step()
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    step()
            optimizer.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


def test_benchmark_shapes():
    from larsopt import bench

    resnet, bert = bench.resnet50_shapes(), bench.bert_base_shapes()
    assert (len(resnet), sum(torch.Size(s).numel() for s in resnet)) == (161, 25_557_032)
    assert (len(bert), sum(torch.Size(s).numel() for s in bert)) == (199, 109_482_240)


@pytest.mark.slow
def test_first_step_within_budget(tmp_path):
    """ResNet-50 shapes, impl="auto": the first step of a new process takes at most 10 s with an
    empty kernel cache (the build included) and at most 3 s with the cache on disk."""
    code = ("import time, torch, larsopt; from larsopt import bench\n"
            "params = [torch.nn.Parameter(torch.randn(shape)) for shape in bench.resnet50_shapes()]\n"
            "for p in params: p.grad = torch.randn_like(p)\n"
            "optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=5e-5)\n"
            "start = time.perf_counter(); optimizer.step(); print(time.perf_counter() - start)")
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    seconds = []
    for _ in ("cold", "warm"):
        output = subprocess.run([sys.executable, "-c", code], env=environment, check=True, capture_output=True,
                                text=True).stdout
        seconds.append(float(output))
    assert any(tmp_path.joinpath("larsopt").glob("*.so"))
    assert seconds[0] < 10.0 and seconds[1] < 3.0, seconds


@pytest.mark.slow
def test_bench_runs(tmp_path):
    from larsopt import bench

    assert bench.main(["--sets", "small", "--steps", "4", "--json", str(tmp_path / "out.json")]) == 0
    assert (tmp_path / "out.json").exists()
