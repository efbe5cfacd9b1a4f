"""multi_precision masters, low-precision params without masters, stochastic rounding."""

import json
from pathlib import Path

import pytest
import torch

import larsopt
from larsopt._impl.reference import stochastic_round_to_bfloat16

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_mxnet_2.0.0b1.json").read_text())
HYPER = dict(lr=0.1, momentum=0.9, eta=0.01, weight_decay=0.01)


def _tensors(dtype, seed=0, shapes=((4, 3), (7,), (2, 3, 2, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(dtype, steps, seed=1):
    return [_tensors(dtype, seed=seed + k) for k in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_source, steps", [("master", 4), ("param", 1)])
def test_masters_follow_the_float32_run(dtype, norm_source, steps):
    """Masters equal a float32 run on the same gradients; params are the masters rounded.

    With norm_source="param" the norms read the rounded params, which equal the masters only on
    the first step.
    """
    low = [p.requires_grad_() for p in _tensors(dtype)]
    full = [p.detach().float().requires_grad_() for p in low]
    opt_low = larsopt.LARS(low, multi_precision=True, norm_source=norm_source, **HYPER)
    opt_full = larsopt.LARS(full, impl="reference", **HYPER)  # the masters' arithmetic, op for op
    for grads in _grads(dtype, steps):
        before = [p.detach().clone() for p in full]
        for p_low, p_full, g in zip(low, full, grads):
            p_low.grad, p_full.grad = g, g.float()
        opt_low.step()
        opt_full.step()
        for p_low, p_full, b in zip(low, full, before):
            master = opt_low.state[p_low]["master_param"]
            assert master.dtype == torch.float32
            assert opt_low.state[p_low]["momentum_buffer"].dtype == torch.float32
            scale = (p_full.detach() - b).abs().max()
            assert (master - p_full.detach()).abs().max() <= 1e-6 * scale
            assert torch.equal(p_low.detach(), master.to(dtype))


def test_float32_params_get_no_master():
    p = torch.randn(5, 3, requires_grad=True)
    opt = larsopt.LARS([p], multi_precision=True, **HYPER)
    p.grad = torch.randn(5, 3)
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}


@pytest.mark.parametrize("path, norm_source", [("step", "master"), ("fused_agg1", "param")])
def test_mxnet_golden_case_h(path, norm_source):
    case = GOLDEN["cases"]["H_fp16_multi_precision"]
    kw = case["kw"]
    weights = [torch.tensor(w, dtype=torch.float16, requires_grad=True) for w in GOLDEN["W0"]]
    opt = larsopt.LARS(weights, lr=kw["learning_rate"], momentum=kw["momentum"], eta=kw["eta"],
                       weight_decay=kw["wd"], multi_precision=True, norm_source=norm_source)
    for step, expected in enumerate(case["out"][path]):
        for w, g in zip(weights, GOLDEN["GS"][step]):
            w.grad = torch.tensor(g, dtype=torch.float16)
        opt.step()
        for w, e in zip(weights, expected):
            e = torch.tensor(e, dtype=torch.float16)
            ulp = torch.finfo(torch.float16).eps * e.float().abs().clamp_min(2**-14)
            assert ((w.detach().float() - e.float()).abs() <= ulp).all(), (path, step)


def test_low_precision_without_masters_rounds_once():
    """Without masters the update is computed in float32 and rounded once: MXNet's spec §5.5
    example (effective lr 1e-8, which MXNet's fp16 kernels round to 0) survives here."""
    def run(multi_precision):
        w = torch.full((4,), 1e-3, dtype=torch.float16, requires_grad=True)
        opt = larsopt.LARS([w], lr=0.1, eta=0.1, multi_precision=multi_precision)
        w.grad = torch.full((4,), 1000.0, dtype=torch.float16)
        opt.step()
        return w.detach(), opt.state[w]
    plain, _ = run(False)
    mixed, state = run(True)
    assert torch.equal(plain, mixed)
    assert state["master_param"][0].item() == pytest.approx(float(torch.tensor(1e-3).half()) - 1e-5, rel=1e-4)


def test_update_below_half_an_ulp_is_lost_without_masters():
    def run(multi_precision):
        w = torch.ones(3, dtype=torch.float16, requires_grad=True)
        opt = larsopt.LARS([{"params": [w], "lars": False}], lr=1e-4, multi_precision=multi_precision)
        w.grad = torch.ones(3, dtype=torch.float16)
        opt.step()
        return w.detach(), opt.state[w]
    plain, _ = run(False)
    assert torch.equal(plain, torch.ones(3, dtype=torch.float16))
    mixed, state = run(True)
    assert torch.equal(mixed, torch.ones(3, dtype=torch.float16))
    assert torch.allclose(state["master_param"], torch.full((3,), 0.9999))


def test_state_dict_keeps_float32_masters_and_continues_bit_identically():
    def make():
        params = [p.requires_grad_() for p in _tensors(torch.bfloat16)]
        return params, larsopt.LARS(params, multi_precision=True, **HYPER)
    grads = _grads(torch.bfloat16, 6)
    ref_params, ref_opt = make()
    params, opt = make()
    for k, step_grads in enumerate(grads):
        for p, q, g in zip(ref_params, params, step_grads):
            p.grad, q.grad = g, g
        ref_opt.step()
        if k < 3:
            opt.step()
        if k == 2:
            saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
            params_copy = [p.detach().clone().requires_grad_() for p in params]
            params, opt = params_copy, larsopt.LARS(params_copy, multi_precision=True, **HYPER)
            opt.load_state_dict(saved)
            assert all(opt.state[p]["master_param"].dtype == torch.float32 for p in params)
            assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in params)
        elif k > 2:
            opt.step()
    for p, q in zip(ref_params, params):
        assert torch.equal(p, q)
        assert torch.equal(ref_opt.state[p]["master_param"], opt.state[q]["master_param"])


def _roundtrip(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_state_without_masters_rebuilds_them_from_params():
    p = torch.randn(6, 2).to(torch.float16).requires_grad_()
    plain = larsopt.LARS([p], **HYPER)
    p.grad = torch.randn(6, 2).to(torch.float16)
    plain.step()
    saved = plain.state_dict()
    opt = larsopt.LARS([p], multi_precision=True, **HYPER)
    opt.load_state_dict(saved)
    opt.step()
    state = opt.state[p]
    assert state["master_param"].dtype == torch.float32 and state["momentum_buffer"].dtype == torch.float32
    assert torch.equal(p.detach(), state["master_param"].to(torch.float16))


def test_stochastic_rounding_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    ulp = 2.0**-7  # bfloat16 ulp in [1, 2)
    for fraction in (0.1, 0.5, 0.9):
        value = torch.full((200_000,), 1.0 + fraction * ulp)
        rounded = stochastic_round_to_bfloat16(value, gen).float()
        assert set(rounded.unique().tolist()) <= {1.0, 1.0 + ulp}
        # Binomial: standard error of the up-rounding frequency is < 0.0012 here; 5 sigma bound.
        assert abs((rounded > 1.0).float().mean().item() - fraction) < 0.006
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0])
    assert torch.equal(stochastic_round_to_bfloat16(exact, gen).float(), exact)


def test_stochastic_rounding_keeps_tiny_bfloat16_updates_on_average():
    def run(stochastic, seed):
        w = torch.ones(100_000, dtype=torch.bfloat16, requires_grad=True)
        opt = larsopt.LARS([w], lr=1.0, stochastic_rounding=stochastic,
                           generator=torch.Generator().manual_seed(seed))
        for group in opt.param_groups:
            group["lars"] = False
        w.grad = torch.full_like(w, 2.0**-10)  # a quarter of the bfloat16 ulp below 1 (2**-8)
        opt.step()
        return w.detach().float()
    assert torch.equal(run(False, 0), torch.ones(100_000))
    mean = run(True, 0).mean().item()
    assert mean == pytest.approx(1.0 - 2.0**-10, abs=4e-5)
    assert torch.equal(run(True, 3), run(True, 3))
