"""larsopt.LARS against a float64 reference of one LARS step written here, from the formulas.

The reference below is deliberately independent of the library: it is NumPy float64, one
tensor at a time, and follows the issue's formulas line by line:

    g    = -g if maximize
    gr   = rescale_grad * g
    lam  = eta*|w| / (|gr| + wd*|w| + epsilon)        trust_norm="sum"
         = eta*|w| / (|gr + wd*w| + epsilon)          trust_norm="update"
         = 1 if |w| == 0, |gr| == 0, or a norm is not finite (MXNet fallback, both norms)
         = 1 for a group with lars=False
    lam  = min(lam / lr, 1)                           trust_clip (not for lars=False groups)
    g'   = clip(gr, -c, c) + wd*w
    paper: v = mu*v - lr*lam*g';  w += v             nesterov: w += mu*v - lr*lam*g'
    torch: b = mu*b + lam*g';     w -= lr*b          nesterov: w -= lr*(lam*g' + mu*b)
    mu == 0:                      w -= lr*lam*g'

float64 params are compared at 1e-12 of the update size, float32 params at 1e-5.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import larsopt

# Tiny tensors: one thread is faster and keeps the run time independent of machine load.
pytestmark = pytest.mark.usefixtures("single_thread")

DEFAULTS = dict(
    lr=0.1,
    momentum=0.0,
    eta=0.001,
    epsilon=1e-8,
    weight_decay=0.0,
    nesterov=False,
    momentum_form="paper",
    trust_norm="sum",
    trust_clip=False,
    rescale_grad=1.0,
    clip_gradient=None,
    maximize=False,
    lars=True,
    impl="auto",
)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def _l2(x: np.ndarray) -> float:
    # Plain float64 sum of squares: inf stays inf and NaN stays NaN, which the fallback needs.
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def reference_trust_ratio(w: np.ndarray, gr: np.ndarray, cfg: dict, lr: float) -> float:
    if not cfg["lars"]:
        return 1.0
    wd = cfg["weight_decay"]
    w_norm, g_norm = _l2(w), _l2(gr)
    # The fallback, for both norms: |w| == 0, |g| == 0 (g rescaled), or a norm not finite.
    valid = w_norm > 0 and g_norm > 0 and math.isfinite(w_norm) and math.isfinite(g_norm)
    if cfg["trust_norm"] == "sum":
        denominator = g_norm + wd * w_norm + cfg["epsilon"]
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            u_norm = _l2(gr + wd * w if wd != 0 else gr)
        # |g + wd*w| is a norm of the formula too: it must be finite (and not 0, to divide by it).
        valid = valid and u_norm > 0 and math.isfinite(u_norm)
        denominator = u_norm + cfg["epsilon"]
    lam = cfg["eta"] * w_norm / denominator if valid else 1.0
    if cfg["trust_clip"]:
        # LARC: step size min(lr*lam, lr). With lr == 0 the step is 0 whatever lam is.
        lam = min(lam / lr, 1.0) if lr > 0 else 1.0
    return lam


def reference_step(w: np.ndarray, g: np.ndarray, buf: np.ndarray | None, cfg: dict, lr: float):
    """One LARS step for one tensor in float64. Returns (new_w, new_buf); buf None = zeros."""
    w = np.asarray(w, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    mu, wd = cfg["momentum"], cfg["weight_decay"]
    with np.errstate(over="ignore", invalid="ignore"):
        if cfg["maximize"]:
            g = -g
        gr = cfg["rescale_grad"] * g
        lam = reference_trust_ratio(w, gr, cfg, lr)
        c = cfg["clip_gradient"]
        gp = np.clip(gr, -c, c) if c is not None else gr
        gp = gp + wd * w if wd != 0 else gp  # wd == 0 adds nothing (0 * inf would be NaN)
        if mu == 0:
            return w - lr * lam * gp, None
        v = np.zeros_like(w) if buf is None else np.asarray(buf, dtype=np.float64)
        if cfg["momentum_form"] == "paper":
            v = mu * v - lr * lam * gp
            new_w = w + (mu * v - lr * lam * gp if cfg["nesterov"] else v)
        else:
            v = mu * v + lam * gp
            new_w = w - lr * (lam * gp + mu * v if cfg["nesterov"] else v)
    return new_w, v


# --------------------------------------------------------------------------------------------
# Harness: run the library and the reference side by side
# --------------------------------------------------------------------------------------------


def _assert_near(got: np.ndarray, ref: np.ndarray, start: np.ndarray, rtol: float, ulps: float, what: str):
    """|got - ref| <= rtol * (size of the update) + ulps * eps * |w|; non-finite entries equal."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: non-finite entries differ\n{got}\n{ref}"
    assert np.array_equal(got[~finite], ref[~finite], equal_nan=True), f"{what}: inf/NaN differ"
    if not finite.any():
        return
    g, r, s = got[finite], ref[finite], np.asarray(start, dtype=np.float64)[finite]
    s = np.where(np.isfinite(s), s, 0.0)
    update = np.max(np.abs(r - s))
    scale = max(np.max(np.abs(r)), np.max(np.abs(s)))
    error = np.max(np.abs(g - r))
    allowed = rtol * update + ulps * scale + 1e-300
    assert error <= allowed, f"{what}: error {error:.3e} > allowed {allowed:.3e} (update size {update:.3e})"


def _lr_value(lr) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def run_and_compare(
    groups: list[dict],
    grads: list[list[list[np.ndarray | None]]],
    lr_schedule: list[float],
    *,
    dtype: torch.dtype = torch.float64,
    tensor_lr: bool | str = False,
    defaults: dict | None = None,
):
    """Run LARS and the reference over ``len(grads)`` steps and compare after every step.

    groups: per group, {"params": [ndarray, ...], **hyper-parameter overrides}.
    grads[step][group][param]: the gradient (None: no grad that step).
    lr_schedule[step]: multiplies every group's base lr at that step (lr changes between steps).

    float64: both run their own trajectory (tolerance 1e-12 of the update size).
    float32: the reference takes the library's state before each step, so rounding of the
    float32 weights does not accumulate (tolerance 1e-5 of the update size plus 1 ulp of w).
    """
    defaults = {**DEFAULTS, **(defaults or {})}
    torch_groups, cfgs, tensors = [], [], []
    for spec in groups:
        spec = dict(spec)
        arrays = spec.pop("params")
        params = [torch.tensor(a, dtype=dtype) for a in arrays]
        tensors.append(params)
        cfg = {**defaults, **spec}
        cfgs.append(cfg)
        torch_groups.append({"params": params, **spec})
    ctor = {k: v for k, v in defaults.items() if k != "lars"}
    opt = larsopt.LARS(torch_groups, **ctor)
    base_lrs = [cfg["lr"] for cfg in cfgs]

    # Reference state (float64 trajectory).
    ref_w = [[p.detach().double().numpy().copy() for p in ps] for ps in tensors]
    ref_b: list[list[np.ndarray | None]] = [[None] * len(ps) for ps in tensors]
    float64 = dtype == torch.float64
    rtol, ulps = (1e-12, 8 * 2.0**-52) if float64 else (1e-5, 2.0**-23)

    for step, (step_grads, factor) in enumerate(zip(grads, lr_schedule)):
        lrs = []
        for group, base in zip(opt.param_groups, base_lrs):
            lr = base * factor
            # tensor_lr: a 0-d float64 tensor, or "float32": a 0-d float32 tensor (its rounded value is the lr).
            lr_dtype = torch.float32 if tensor_lr == "float32" else torch.float64
            group["lr"] = torch.tensor(lr, dtype=lr_dtype) if tensor_lr else lr
            lrs.append(_lr_value(group["lr"]))
        before, lib_before = [], [[p.detach().clone() for p in ps] for ps in tensors]
        for gi, ps in enumerate(tensors):
            for pi, p in enumerate(ps):
                g = step_grads[gi][pi]
                p.grad = None if g is None else torch.tensor(g, dtype=dtype)
                if not float64:
                    # Per-step comparison: restart the reference from the library's state.
                    ref_w[gi][pi] = p.detach().double().numpy().copy()
                    buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
                    ref_b[gi][pi] = None if buf is None else buf.double().numpy().copy()
            before.append([w.copy() for w in ref_w[gi]])
        opt.step()
        for gi, (ps, cfg) in enumerate(zip(tensors, cfgs)):
            for pi, p in enumerate(ps):
                g = step_grads[gi][pi]
                what = f"step {step}, group {gi}, param {pi} (shape {tuple(p.shape)}), cfg {cfg}"
                if g is None:
                    # No gradient: skipped entirely, not even momentum or weight decay.
                    assert torch.equal(p.detach(), lib_before[gi][pi]), what
                    continue
                g64 = torch.tensor(g, dtype=dtype).double().numpy()
                buf_before = ref_b[gi][pi]
                ref_w[gi][pi], ref_b[gi][pi] = reference_step(ref_w[gi][pi], g64, ref_b[gi][pi], cfg, lrs[gi])
                _assert_near(p.detach().numpy(), ref_w[gi][pi], before[gi][pi], rtol, ulps, "weight: " + what)
                state = opt.state[p] if p in opt.state else {}
                if cfg["momentum"] == 0:
                    assert "momentum_buffer" not in state, what
                else:
                    buf = state["momentum_buffer"].detach().numpy()
                    # Measured against the buffer the step started from: mu * b + ... can cancel to a
                    # value far below its terms, and float32 is then exact only to an ulp of the terms.
                    start = np.zeros_like(ref_b[gi][pi]) if buf_before is None else buf_before
                    _assert_near(buf, ref_b[gi][pi], start, rtol, ulps, "momentum_buffer: " + what)
    return opt


SHAPES = [(), (7,), (3, 5), (2, 3, 2, 2)]


def make_problem(seed: int, shapes=SHAPES, steps: int = 4, grad_scales=None, n_groups: int = 1):
    """Random weights and gradients; gradient scales vary per tensor so that trust ratios (and
    the trust_clip branch) differ a lot between tensors."""
    rng = np.random.default_rng(seed)
    grad_scales = grad_scales or [10.0 ** rng.uniform(-2, 2) for _ in shapes]
    params = [rng.standard_normal(s) for s in shapes]
    grads = [[[rng.standard_normal(s) * k for s, k in zip(shapes, grad_scales)] for _ in range(n_groups)]
             for _ in range(steps)]
    return params, grads


LR_SCHEDULE = [1.0, 0.5, 2.0, 0.25]

# Every implementation behind the functional core must give the reference's numbers.
IMPLS = list(larsopt.functional.IMPLS)


@pytest.fixture(params=IMPLS)
def impl(request):
    """The implementation under test (tests that take ``impl`` run once per implementation)."""
    return request.param  # lr changes at every step: paper and torch forms differ


# --------------------------------------------------------------------------------------------
# Sanity of the reference itself (hand computed)
# --------------------------------------------------------------------------------------------


def test_reference_by_hand():
    # |w| = 5, |g| = 1, wd = 0.1: lam = 0.5 * 5 / (1 + 0.5 + 0) = 5/3; g' = g + 0.1 w.
    cfg = {**DEFAULTS, "eta": 0.5, "epsilon": 0.0, "weight_decay": 0.1, "impl": "auto"}
    w, g = np.array([3.0, 4.0]), np.array([0.6, 0.8])
    new_w, _ = reference_step(w, g, None, cfg, lr=0.3)
    expected = w - 0.3 * (5 / 3) * (g + 0.1 * w)
    np.testing.assert_allclose(new_w, expected, rtol=1e-15)
    opt_w = torch.tensor(w, requires_grad=True)
    opt = larsopt.LARS([opt_w], lr=0.3, eta=0.5, epsilon=0.0, weight_decay=0.1)
    opt_w.grad = torch.tensor(g)
    opt.step()
    np.testing.assert_allclose(opt_w.detach().numpy(), expected, rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Every option and combination
# --------------------------------------------------------------------------------------------

MOMENTUM_SETTINGS = [(0.0, "paper", False), (0.9, "paper", False), (0.9, "paper", True),
                     (0.9, "torch", False), (0.9, "torch", True)]
GRAD_SETTINGS = [
    dict(rescale_grad=1.0, clip_gradient=None, maximize=False),
    dict(rescale_grad=-0.5, clip_gradient=0.3, maximize=True),  # negative rescale: |r| in the norm
    dict(rescale_grad=2.0, clip_gradient=0.0, maximize=False),  # clip 0: only weight decay moves w
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("trust_norm", ["sum", "update"])
@pytest.mark.parametrize("grad_setting", range(len(GRAD_SETTINGS)))
@pytest.mark.parametrize("momentum_setting", MOMENTUM_SETTINGS, ids=lambda m: f"mu{m[0]}-{m[1]}-nest{m[2]}")
def test_every_combination_float64(momentum_setting, grad_setting, trust_norm, trust_clip, weight_decay, impl):
    momentum, form, nesterov = momentum_setting
    seed = zlib.crc32(repr((momentum_setting, grad_setting, trust_norm, trust_clip, weight_decay)).encode())
    params, grads = make_problem(seed)
    # eta chosen so that lam is sometimes above and sometimes below lr (both trust_clip branches).
    group = dict(params=params, lr=0.2, momentum=momentum, momentum_form=form, nesterov=nesterov, eta=0.05,
                 trust_norm=trust_norm, trust_clip=trust_clip, weight_decay=weight_decay, impl=impl,
                 **GRAD_SETTINGS[grad_setting])
    run_and_compare([group], grads, LR_SCHEDULE, tensor_lr=bool(seed % 2))


@pytest.mark.parametrize("tensor_lr", [False, True, "float32"])
@pytest.mark.parametrize("momentum_setting", MOMENTUM_SETTINGS, ids=lambda m: f"mu{m[0]}-{m[1]}-nest{m[2]}")
@pytest.mark.parametrize("trust_norm", ["sum", "update"])
def test_lr_changes_float_and_tensor(momentum_setting, trust_norm, tensor_lr, impl):
    momentum, form, nesterov = momentum_setting
    params, grads = make_problem(11, steps=6)
    group = dict(params=params, lr=0.5, momentum=momentum, momentum_form=form, nesterov=nesterov, eta=0.02,
                 weight_decay=1e-3, trust_norm=trust_norm)
    run_and_compare([group], grads, [1.0, 0.1, 0.7, 0.0, 3.0, 0.3], tensor_lr=tensor_lr, defaults={"impl": impl})


def test_paper_and_torch_forms_differ_when_lr_changes(impl):
    # The two forms coincide at constant lr and must differ once it changes (the reason both exist).
    results = {}
    for schedule in ([1.0, 1.0, 1.0], [1.0, 0.5, 0.25]):
        for form in ("paper", "torch"):
            w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
            opt = larsopt.LARS([w], impl=impl, lr=1.0, momentum=0.9, momentum_form=form, eta=0.1)
            for factor in schedule:
                opt.param_groups[0]["lr"] = factor
                w.grad = torch.tensor([0.5, 0.1, -0.3], dtype=torch.float64)
                opt.step()
            results[tuple(schedule), form] = w.clone()
    torch.testing.assert_close(results[(1.0, 1.0, 1.0), "paper"], results[(1.0, 1.0, 1.0), "torch"],
                               rtol=1e-14, atol=1e-14)
    assert not torch.allclose(results[(1.0, 0.5, 0.25), "paper"], results[(1.0, 0.5, 0.25), "torch"])


@pytest.mark.parametrize("eta", [0.0, 1e-3, 0.1, 2.0])
@pytest.mark.parametrize("epsilon", [0.0, 1e-8, 0.5])
def test_eta_and_epsilon(eta, epsilon, impl):
    params, grads = make_problem(int(eta * 1000 + epsilon * 7919) + 3)
    group = dict(params=params, lr=0.3, momentum=0.9, eta=eta, epsilon=epsilon, weight_decay=0.01)
    run_and_compare([group], grads, LR_SCHEDULE, defaults={"impl": impl})


def test_multiple_groups_with_different_settings(impl):
    shapes = [(4,), (2, 3), (2, 2, 2, 2), ()]
    rng = np.random.default_rng(5)
    group_cfgs = [
        dict(lr=0.1, momentum=0.9, momentum_form="paper", trust_norm="sum", weight_decay=1e-2, eta=0.02),
        dict(lr=0.3, momentum=0.8, momentum_form="torch", nesterov=True, trust_norm="update", trust_clip=True,
             eta=0.5),
        dict(lr=0.05, momentum=0.0, lars=False, weight_decay=0.1),  # no trust ratio, decay still applies
        dict(lr=0.2, momentum=0.5, lars=False, weight_decay=0.0, rescale_grad=3.0, clip_gradient=0.5,
             maximize=True),
        dict(lr=1.5, momentum=0.9, nesterov=True, trust_clip=True, eta=0.3, rescale_grad=-1.0),
    ]
    groups = [dict(params=[rng.standard_normal(s) for s in shapes], **cfg) for cfg in group_cfgs]
    grads = [[[rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 2) for s in shapes] for _ in groups]
             for _ in range(5)]
    run_and_compare(groups, grads, [1.0, 0.5, 0.5, 2.0, 0.1], defaults={"impl": impl})
    run_and_compare(groups, grads, [1.0, 0.5, 0.5, 2.0, 0.1], tensor_lr=True, defaults={"impl": impl})


def test_lars_false_group_uses_plain_lr_and_keeps_weight_decay(impl):
    # lars=False: lam = 1 exactly (no eta), weight decay unchanged; trust_clip does not rescale it.
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)
    # lr = 0.1 is not a float32 number: a float64 param must see the float64 lr (no rounding).
    opt = larsopt.LARS([{"params": [w], "lars": False}], lr=0.1, weight_decay=0.1, eta=0.001, trust_clip=True,
                       impl=impl)
    start = w.clone()
    w.grad = g
    opt.step()
    torch.testing.assert_close(w, start - 0.1 * (g + 0.1 * start), rtol=1e-15, atol=0)


def test_lars_false_groups_in_reference(impl):
    params, grads = make_problem(21)
    for momentum, form in ((0.0, "paper"), (0.9, "paper"), (0.9, "torch")):
        group = dict(params=params, lars=False, lr=0.1, momentum=momentum, momentum_form=form, weight_decay=0.05,
                     trust_clip=True, rescale_grad=0.5, clip_gradient=1.0)
        run_and_compare([group], grads, LR_SCHEDULE, defaults={"impl": impl})


# --------------------------------------------------------------------------------------------
# Fallback: lam = 1 (plain lr, no eta)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust_norm", ["sum", "update"])
@pytest.mark.parametrize("momentum_form", ["paper", "torch"])
def test_zero_weights_fall_back_to_plain_lr(trust_norm, momentum_form, impl):
    w = torch.zeros(2, 3, dtype=torch.float64)
    g = torch.tensor([[0.1, -0.2, 0.3], [1.0, 2.0, -3.0]], dtype=torch.float64)
    opt = larsopt.LARS([w], impl=impl, lr=0.5, eta=0.001, momentum=0.9, momentum_form=momentum_form,
                       trust_norm=trust_norm, weight_decay=0.1)
    w.grad = g
    opt.step()
    # |w| == 0 -> lam = 1: the first step is -lr * g, not -lr * eta * ... (eta is not applied).
    torch.testing.assert_close(w, -0.5 * g, rtol=1e-15, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_grad_falls_back_to_plain_lr_sum_norm(momentum, impl):
    # |g| == 0 with wd > 0: lam = 1, so only weight decay moves w, at the full lr.
    w = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64)
    start = w.clone()
    opt = larsopt.LARS([w], impl=impl, lr=0.5, eta=0.001, momentum=momentum, weight_decay=0.1,
                       trust_norm="sum")
    w.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w, start - 0.5 * 0.1 * start, rtol=1e-15, atol=0)


def test_rescale_grad_zero_falls_back(impl):
    # r == 0 makes |r*g| == 0: MXNet's python path falls back to lam = 1 (spec section 3.1).
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    start = w.clone()
    opt = larsopt.LARS([w], impl=impl, lr=0.1, eta=0.001, rescale_grad=0.0, weight_decay=0.5)
    w.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w, start - 0.1 * 0.5 * start, rtol=1e-15, atol=0)


@pytest.mark.parametrize("momentum_form", ["paper", "torch"])
def test_zero_grad_update_norm_with_weight_decay(momentum_form, impl):
    # The issue states one fallback for both norms: |g| == 0 gives lam = 1, even though
    # |g + wd*w| is not 0 for trust_norm="update". Only weight decay moves w, at the full lr.
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    start = w.clone()
    opt = larsopt.LARS([w], impl=impl, lr=0.1, eta=0.01, epsilon=0.0, weight_decay=0.5, trust_norm="update",
                       momentum=0.9, momentum_form=momentum_form)
    w.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w, start - 0.1 * 0.5 * start, rtol=1e-15, atol=0)


def test_zero_weights_and_zero_grads_in_reference(impl):
    shapes = [(3,), (2, 2), (1, 2, 2, 1), ()]
    rng = np.random.default_rng(8)
    params = [np.zeros(shapes[0]), rng.standard_normal(shapes[1]), np.zeros(shapes[2]), np.array(0.0)]
    grads = []
    for step in range(4):
        gs = [rng.standard_normal(s) for s in shapes]
        gs[1] = np.zeros(shapes[1]) if step % 2 == 0 else gs[1]  # zero grad on alternate steps
        gs[3] = np.array(0.0) if step == 1 else gs[3]
        grads.append([gs])
    for trust_norm in ("sum", "update"):
        for form in ("paper", "torch"):
            group = dict(params=params, lr=0.2, momentum=0.9, momentum_form=form, trust_norm=trust_norm,
                         weight_decay=0.01, eta=0.01, trust_clip=form == "torch")
            run_and_compare([group], grads, LR_SCHEDULE, defaults={"impl": impl})


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("trust_norm", ["sum", "update"])
@pytest.mark.parametrize("clip_gradient", [None, 0.5])
def test_non_finite_grad_falls_back_to_lam_one(bad, trust_norm, clip_gradient, impl):
    # A non-finite gradient norm gives lam = 1 (MXNet python path, spec section 3.1 fallback table).
    w0 = np.array([1.0, -2.0, 0.5, 4.0])
    g = np.array([0.1, bad, -0.2, 0.3])
    cfg = {**DEFAULTS, "lr": 0.1, "weight_decay": 0.01, "trust_norm": trust_norm, "clip_gradient": clip_gradient}
    expected, _ = reference_step(w0, g, None, cfg, 0.1)
    # Finite entries moved by the full lr (lam = 1, no eta).
    gp = g[[0, 2, 3]] if clip_gradient is None else np.clip(g[[0, 2, 3]], -0.5, 0.5)
    np.testing.assert_allclose(expected[[0, 2, 3]], w0[[0, 2, 3]] - 0.1 * (gp + 0.01 * w0[[0, 2, 3]]))
    w = torch.tensor(w0)
    opt = larsopt.LARS([w], impl=impl, lr=0.1, weight_decay=0.01, trust_norm=trust_norm,
                       clip_gradient=clip_gradient)
    w.grad = torch.tensor(g)
    opt.step()
    _assert_near(w.numpy(), expected, w0, 1e-12, 1e-15, "non-finite grad")


def test_non_finite_weight_falls_back(impl):
    w0 = np.array([1.0, np.inf, 0.5])
    g = np.array([0.1, 0.2, 0.3])
    expected, _ = reference_step(w0, g, None, {**DEFAULTS, "lr": 0.1}, 0.1)
    w = torch.tensor(w0)
    opt = larsopt.LARS([w], impl=impl, lr=0.1)
    w.grad = torch.tensor(g)
    opt.step()
    _assert_near(w.numpy(), expected, w0, 1e-12, 1e-15, "inf weight")
    assert w[0].item() == pytest.approx(1.0 - 0.1 * 0.1, rel=1e-15)  # lam = 1


def test_non_finite_grads_in_reference_multi_step(impl):
    params, grads = make_problem(31, shapes=[(5,), (2, 3)])
    grads[1][0][0][2] = np.inf
    grads[2][0][1][0, 1] = np.nan
    for form in ("paper", "torch"):
        group = dict(params=params, lr=0.1, momentum=0.9, momentum_form=form, clip_gradient=1.0, eta=0.01)
        run_and_compare([group], grads, LR_SCHEDULE[:3], defaults={"impl": impl})


# --------------------------------------------------------------------------------------------
# Skipped params, shapes, float32
# --------------------------------------------------------------------------------------------


def test_params_without_grad_are_skipped(impl):
    params, grads = make_problem(41, shapes=[(3,), (2, 2), (4,)])
    grads[0][0][1] = None  # no grad at step 0: untouched and no state yet
    grads[2][0][0] = None  # no grad at step 2: untouched, its momentum buffer not decayed
    grads[3][0][2] = None
    for form in ("paper", "torch"):
        group = dict(params=params, lr=0.1, momentum=0.9, momentum_form=form, weight_decay=0.1, eta=0.05)
        opt = run_and_compare([group], grads[:1], [1.0], defaults={"impl": impl})
        never_stepped = opt.param_groups[0]["params"][1]
        assert not opt.state.get(never_stepped), "a param that never had a grad has no state"
        run_and_compare([group], grads, LR_SCHEDULE, defaults={"impl": impl})


@pytest.mark.parametrize("shape", [(), (1,), (13,), (3, 1, 4), (2, 3, 4, 5), (1, 1, 1, 1)])
def test_shapes(shape, impl):
    params, grads = make_problem(sum(shape) + len(shape), shapes=[shape])
    group = dict(params=params, lr=0.3, momentum=0.9, nesterov=True, eta=0.05, weight_decay=1e-2, trust_clip=True)
    run_and_compare([group], grads, LR_SCHEDULE, defaults={"impl": impl})


@pytest.mark.parametrize("momentum_setting", MOMENTUM_SETTINGS, ids=lambda m: f"mu{m[0]}-{m[1]}-nest{m[2]}")
@pytest.mark.parametrize("trust_norm", ["sum", "update"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_float32_params_against_float64_reference(momentum_setting, trust_norm, tensor_lr, impl):
    momentum, form, nesterov = momentum_setting
    params, grads = make_problem(51 + len(trust_norm), shapes=[(), (9,), (4, 6), (2, 3, 3, 2)], steps=4,
                                 grad_scales=[0.5, 1.0, 3.0, 0.2])
    params = [np.asarray(p, dtype=np.float32) for p in params]
    # Large eta and lr so that the update is well above the float32 rounding of w itself.
    group = dict(params=params, lr=0.5, momentum=momentum, momentum_form=form, nesterov=nesterov, eta=0.5,
                 trust_norm=trust_norm, weight_decay=0.01, rescale_grad=0.5, clip_gradient=0.8,
                 trust_clip=tensor_lr)
    run_and_compare([group], grads, LR_SCHEDULE, dtype=torch.float32, tensor_lr=tensor_lr, defaults={"impl": impl})


# --------------------------------------------------------------------------------------------
# Hypothesis: random configurations
# --------------------------------------------------------------------------------------------

config_strategy = st.fixed_dictionaries(
    dict(
        lr=st.sampled_from([0.0, 0.01, 0.1, 0.7, 1.0, 3.0]),
        momentum=st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.99]),
        eta=st.sampled_from([0.0, 1e-3, 0.02, 0.5, 1.0]),
        epsilon=st.sampled_from([0.0, 1e-8, 1e-3, 1.0]),
        weight_decay=st.sampled_from([0.0, 1e-4, 0.05, 1.0]),
        nesterov=st.booleans(),
        momentum_form=st.sampled_from(["paper", "torch"]),
        trust_norm=st.sampled_from(["sum", "update"]),
        trust_clip=st.booleans(),
        rescale_grad=st.sampled_from([1.0, 0.5, -0.25, 4.0, 0.0]),
        clip_gradient=st.sampled_from([None, 0.0, 0.1, 1.0, 100.0]),
        maximize=st.booleans(),
        lars=st.booleans(),
        impl=st.sampled_from(IMPLS),
    )
)
shape_strategy = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfgs=st.lists(config_strategy, min_size=1, max_size=3),
    shapes=st.lists(shape_strategy, min_size=1, max_size=3),
    lr_schedule=st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0]), min_size=1, max_size=4),
    zero_mask=st.integers(0, 2**12 - 1),
    seed=st.integers(0, 2**32 - 1),
    tensor_lr=st.booleans(),
)
def test_random_configurations_float64(cfgs, shapes, lr_schedule, zero_mask, seed, tensor_lr):
    rng = np.random.default_rng(seed)
    groups, grads = [], [[] for _ in lr_schedule]
    bit = 0
    for cfg in cfgs:
        if cfg["momentum"] == 0:
            cfg["nesterov"] = False  # nesterov needs momentum (a ValueError otherwise)
        params = []
        for shape in shapes:
            # Some weights are all zero (fallback), others have very different scales.
            zero = (zero_mask >> (bit % 12)) & 1 and bit % 3 == 0
            bit += 1
            params.append(np.zeros(shape) if zero else rng.standard_normal(shape) * 10.0 ** rng.uniform(-1, 1))
        groups.append(dict(params=params, **cfg))
        for step in range(len(lr_schedule)):
            gs = []
            for shape in shapes:
                roll = rng.uniform()
                if roll < 0.1:
                    gs.append(None)
                elif roll < 0.2:
                    gs.append(np.zeros(shape))
                else:
                    gs.append(rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2))
            grads[step].append(gs)
    run_and_compare(groups, grads, lr_schedule, tensor_lr=tensor_lr)


# A fixed, enumerated sweep of all boolean and string options together (2^4 * 2 * 2 cases).
@pytest.mark.parametrize(
    "nesterov,trust_clip,maximize,lars,form,norm",
    list(itertools.product([False, True], [False, True], [False, True], [False, True], ["paper", "torch"],
                           ["sum", "update"])),
)
def test_boolean_option_sweep(nesterov, trust_clip, maximize, lars, form, norm, impl):
    params, grads = make_problem(61, shapes=[(5,), (2, 2, 1, 3)], steps=3, grad_scales=[0.01, 5.0])
    group = dict(params=params, lr=0.4, momentum=0.9, nesterov=nesterov, trust_clip=trust_clip, maximize=maximize,
                 lars=lars, momentum_form=form, trust_norm=norm, clip_gradient=0.2 if nesterov else None, eta=0.1,
                 weight_decay=0.02, rescale_grad=-2.0)
    run_and_compare([group], grads, [1.0, 0.3, 1.7], defaults={"impl": impl})


# --------------------------------------------------------------------------------------------
# Memory layouts, empty and large tensors, mixed dtypes: every implementation
# --------------------------------------------------------------------------------------------


def _layout(array: np.ndarray, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor with the values of ``array`` in the given memory layout."""
    t = torch.tensor(array, dtype=dtype)
    if kind == "transposed":  # non-contiguous view-like strides
        return t.t().contiguous().t() if t.ndim == 2 else t
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
    if kind == "strided":  # every other element of a bigger buffer
        big = torch.zeros(t.shape + (2,), dtype=dtype)
        big[..., 0] = t
        return big[..., 0]
    return t


LAYOUTS = ["contiguous", "transposed", "channels_last", "strided"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("param_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_memory_layouts(param_layout, grad_layout, impl, dtype):
    # Params and grads may be non-contiguous or channels_last, and need not share a layout.
    rng = np.random.default_rng(71)
    shapes = [(5, 3), (2, 3, 4, 2), (6,)]
    arrays = [rng.standard_normal(s) for s in shapes]
    params = [_layout(a, param_layout, dtype) for a in arrays]
    cfg = {**DEFAULTS, "lr": 0.5, "momentum": 0.9, "eta": 0.3, "weight_decay": 0.01, "clip_gradient": 0.7,
           "rescale_grad": 0.5, "impl": impl}
    opt = larsopt.LARS(params, **{k: v for k, v in cfg.items() if k != "lars"})
    ref = [p.double().numpy().copy() for p in params]
    bufs = [None] * len(params)
    for step in range(3):
        grads = [rng.standard_normal(s) * (step + 1) for s in shapes]
        starts = [p.detach().double().numpy().copy() for p in params]
        for p, g in zip(params, grads):
            p.grad = _layout(g, grad_layout, dtype)
        if dtype == torch.float32:  # per-step comparison from the library's state (see run_and_compare)
            ref = starts
            bufs = [opt.state[p]["momentum_buffer"].double().numpy() if step else None for p in params]
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            g64 = torch.tensor(g, dtype=dtype).double().numpy()
            ref[i], bufs[i] = reference_step(ref[i], g64, bufs[i], cfg, 0.5)
            rtol, ulps = (1e-12, 8 * 2.0**-52) if dtype == torch.float64 else (1e-5, 2.0**-23)
            _assert_near(p.detach().numpy(), ref[i], starts[i], rtol, ulps, f"{param_layout}/{grad_layout} #{i}")
    if param_layout == "channels_last":  # the param keeps its layout
        assert params[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_empty_tensors(impl, momentum):
    # numel == 0: |w| == 0 (fallback) and nothing to update; must not fail or touch the others.
    params = [torch.zeros(0), torch.zeros(3, 0, 2), torch.tensor([1.0, -2.0])]
    opt = larsopt.LARS(params, lr=0.1, momentum=momentum, impl=impl, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert params[0].shape == (0,) and params[1].shape == (3, 0, 2)
    lam = 0.001 * math.sqrt(5) / (math.sqrt(2) + 0.1 * math.sqrt(5) + 1e-8)
    expected = torch.tensor([1.0, -2.0]) - 0.1 * lam * (torch.ones(2) + 0.1 * torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(params[2], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_tensor(impl, dtype):
    # Big enough for any chunked or parallel norm reduction in a fast path.
    rng = np.random.default_rng(81)
    params, grads = [rng.standard_normal(300_001)], [[[rng.standard_normal(300_001) * 0.01]] for _ in range(2)]
    if dtype == torch.float32:
        params = [params[0].astype(np.float32)]
    group = dict(params=params, lr=0.5, momentum=0.9, momentum_form="torch", nesterov=True, eta=0.5,
                 weight_decay=1e-3, trust_norm="update", impl=impl)
    run_and_compare([group], grads, [1.0, 0.5], dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_in_one_group(impl):
    # float32 and float64 params in the same group: each gets its own norms and arithmetic.
    rng = np.random.default_rng(91)
    a64, a32 = rng.standard_normal((4, 3)), rng.standard_normal((7,)).astype(np.float32)
    p64, p32 = torch.tensor(a64), torch.tensor(a32)
    cfg = {**DEFAULTS, "lr": 0.3, "momentum": 0.9, "eta": 0.2, "weight_decay": 0.01, "impl": impl}
    opt = larsopt.LARS([p64, p32], **{k: v for k, v in cfg.items() if k != "lars"})
    g64, g32 = rng.standard_normal((4, 3)), rng.standard_normal(7).astype(np.float32)
    p64.grad, p32.grad = torch.tensor(g64), torch.tensor(g32)
    opt.step()
    ref64, _ = reference_step(a64, g64, None, cfg, 0.3)
    ref32, _ = reference_step(a32, g32, None, cfg, 0.3)
    _assert_near(p64.numpy(), ref64, a64, 1e-12, 8 * 2.0**-52, "float64 param")
    _assert_near(p32.numpy(), ref32, a32, 1e-5, 2.0**-23, "float32 param")
    assert p64.dtype == torch.float64 and p32.dtype == torch.float32


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy, shape=shape_strategy, seed=st.integers(0, 2**32 - 1), tensor_lr=st.booleans())
def test_random_configurations_float32(cfg, shape, seed, tensor_lr):
    # float32 params (the fast paths' main case) against the float64 reference, step by step.
    if cfg["momentum"] == 0:
        cfg["nesterov"] = False
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape).astype(np.float32)]
    grads = [[[rng.standard_normal(shape) * 10.0 ** rng.uniform(-1, 1)]] for _ in range(3)]
    run_and_compare([dict(params=params, **cfg)], grads, [1.0, 0.5, 2.0], dtype=torch.float32, tensor_lr=tensor_lr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_accumulate_in_float32_for_half_params(dtype, impl):
    # "Norms accumulate in fp32 at least": 100 * 300^2 = 9e6 overflows float16 (max 65504); in
    # float32 |w| = 3000 and |g| = 10, so lam = 1e-3 * 3000 / 10 = 0.3, not the fallback lam = 1.
    w = torch.full((100,), 300.0, dtype=dtype)
    opt = larsopt.LARS([w], lr=1.0, eta=1e-3, epsilon=0.0, impl=impl)
    w.grad = torch.ones(100, dtype=dtype)
    opt.step()
    expected = torch.full((100,), 300.0 - 0.3, dtype=torch.float32).to(dtype)  # rounded once
    assert torch.equal(w, expected), (w[0].item(), expected[0].item())
