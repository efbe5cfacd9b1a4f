"""Port of MXNet's own ``test_optimizer.py::test_lars`` grid (spec §10.1), against a float64 reference.

MXNet compares its ``step`` and ``fused_step`` paths with each other for one step; here both
paths are compared with a float64 re-implementation written below from the spec (not imported
from the library), over 1-3 steps, on the same grid: shapes (3,4,5), (10,4), (7,); U[0,1)
weights and grads; eta x momentum x clip_gradient x rescale_grad x wd x multi_precision x
aggregate_num; float32 (every combination, to 1e-5) and float16 (multi_precision only, within
one float16 ulp, tighter than MXNet's 1e-3).
"""

import itertools

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx

SHAPES = [(3, 4, 5), (10, 4), (7,)]
ETAS = [None, 0.002, 0.01]  # None: the default 0.001
MOMENTA = [0.0, 0.9]
CLIPS = [None, 0.4]
RESCALES = [1.0, 0.14]
WDS = [0.0, 0.03, 0.05]
AGGREGATES = [0, 1, 4, np.inf]
STEPS = 3


def reference_lars(weights, grads_per_step, *, lr, eta, epsilon, momentum, wd, rescale_grad, clip_gradient,
                   float16_master, norm_from_float16):
    """MXNet 2.0 LARS in float64 (spec §3, §3.1): the weights after each step.

    ``float16_master``: the weights are float16 with a master copy (multi_precision); the
    master is kept here in float64 and the float16 weight is its rounding.
    ``norm_from_float16``: |w| of the trust ratio from the float16 weight (MXNet's fused path)
    instead of the master (its step path).
    """
    masters = [w.astype(np.float64) for w in weights]
    moms = [np.zeros_like(m) for m in masters]
    history = []
    for grads in grads_per_step:
        for i, grad in enumerate(grads):
            w = masters[i]
            g = grad.astype(np.float64)
            w_for_norm = w.astype(np.float16).astype(np.float64) if norm_from_float16 else w
            w_norm = np.sqrt(np.sum(w_for_norm ** 2))
            g_norm = abs(rescale_grad) * np.sqrt(np.sum(g ** 2))
            if w_norm > 0 and g_norm > 0 and np.isfinite(w_norm) and np.isfinite(g_norm):
                lam = eta * w_norm / (g_norm + wd * w_norm + epsilon)
            else:
                lam = 1.0
            update = rescale_grad * g
            if clip_gradient is not None:
                update = np.clip(update, -clip_gradient, clip_gradient)
            update = update + wd * w
            if momentum > 0:
                moms[i] = momentum * moms[i] - lr * lam * update
                masters[i] = w + moms[i]
            else:
                masters[i] = w - lr * lam * update
        history.append([m.astype(np.float16) if float16_master else m for m in masters])
    return history


def grid_kwargs():
    for eta, momentum, clip, rescale, wd in itertools.product(ETAS, MOMENTA, CLIPS, RESCALES, WDS):
        kwargs = {"momentum": momentum, "rescale_grad": rescale, "wd": wd}
        if eta is not None:
            kwargs["eta"] = eta
        if clip is not None:
            kwargs["clip_gradient"] = clip
        yield kwargs


def run_grid(dtype: np.dtype, multi_precision: bool, aggregate_num, steps: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    checked = 0
    for kwargs in grid_kwargs():
        weights0 = [rng.uniform(size=shape).astype(dtype) for shape in SHAPES]
        grads = [[rng.uniform(size=shape).astype(dtype) for shape in SHAPES] for _ in range(steps)]
        for use_fused_step in (False, True):
            opt = lmx.LARS(use_fused_step=use_fused_step, multi_precision=multi_precision,
                           aggregate_num=aggregate_num, **kwargs)
            weights = [torch.from_numpy(w.copy()) for w in weights0]
            states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(weights)]
            expected = reference_lars(
                weights0, grads, lr=0.1, eta=kwargs.get("eta", 0.001), epsilon=1e-8,
                momentum=kwargs["momentum"], wd=kwargs["wd"], rescale_grad=kwargs["rescale_grad"],
                clip_gradient=kwargs.get("clip_gradient"),
                float16_master=dtype == np.float16, norm_from_float16=dtype == np.float16 and use_fused_step)
            for step in range(steps):
                opt.update_multi_precision([0, 1, 2], weights, [torch.from_numpy(g) for g in grads[step]], states)
                for got, want in zip(weights, expected[step]):
                    if dtype == np.float16:
                        # The float32 master and the float64 one round to the same float16, or to a
                        # neighbour when they straddle a rounding boundary.
                        ulp = np.spacing(np.abs(want)).astype(np.float64)
                        assert np.all(np.abs(got.numpy().astype(np.float64) - want) <= ulp)
                    else:
                        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
                checked += 1
    return checked


@pytest.mark.parametrize("aggregate_num", AGGREGATES, ids=lambda a: f"agg{a}")
@pytest.mark.parametrize("multi_precision", [False, True], ids=["mp0", "mp1"])
def test_lars_grid_float32(multi_precision: bool, aggregate_num) -> None:
    checked = run_grid(np.float32, multi_precision, aggregate_num, steps=STEPS, seed=1)
    assert checked == 72 * 2 * STEPS


@pytest.mark.parametrize("aggregate_num", AGGREGATES, ids=lambda a: f"agg{a}")
def test_lars_grid_float16_multi_precision(aggregate_num) -> None:
    checked = run_grid(np.float16, True, aggregate_num, steps=STEPS, seed=2)
    assert checked == 72 * 2 * STEPS


def test_lars_grid_single_step_paths_agree() -> None:
    """MXNet's own check: after one step the step and fused paths agree (rtol = atol = 1e-3)."""
    rng = np.random.default_rng(3)
    for kwargs in grid_kwargs():
        weights0 = [rng.uniform(size=shape).astype(np.float32) for shape in SHAPES]
        grads = [torch.from_numpy(rng.uniform(size=shape).astype(np.float32)) for shape in SHAPES]
        results = []
        for use_fused_step in (False, True):
            opt = lmx.LARS(use_fused_step=use_fused_step, **kwargs)
            weights = [torch.from_numpy(w.copy()) for w in weights0]
            states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(weights)]
            opt.update_multi_precision([0, 1, 2], weights, grads, states)
            results.append((weights, states))
        (w_step, s_step), (w_fused, s_fused) = results
        for a, b in zip(w_step + [s for s in s_step if s is not None], w_fused + [s for s in s_fused if s is not None]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-3)
