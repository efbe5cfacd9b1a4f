"""Where MXNet 2.0 has bugs (spec §6, §8), lmx.LARS does one documented thing on every path.

See docs/mxnet-compatibility.md for MXNet's behaviour beside ours.
"""

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx

PATHS = {
    "step": {"use_fused_step": False},
    "fused_agg1": {"aggregate_num": 1},
    "fused_agg4": {"aggregate_num": 4},
    "fused_inf": {"aggregate_num": np.inf},
}


def run_paths(weights0, grads_per_step, **kwargs):
    """The weights after the steps on every path, through an Updater (as Gluon does)."""
    results = {}
    for path, path_kwargs in PATHS.items():
        opt = lmx.LARS(**kwargs, **path_kwargs)
        updater = lmx.get_updater(opt)
        weights = [w.clone() for w in weights0]
        for grads in grads_per_step:
            updater(list(range(len(weights))), grads, weights)
        results[path] = (weights, updater.states)
    return results


def assert_all_paths_equal(results):
    (_, (reference, _)), *others = results.items()
    for path, (weights, _) in others:
        for a, b in zip(weights, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True, msg=path)


def test_b1_multi_precision_aggregated_keeps_masters_with_their_weights():
    # MXNet pairs masters and momenta with the wrong weights when an excluded name precedes a
    # LARS param in one aggregated call (a silent swap for equal shapes).
    torch.manual_seed(0)
    weights0 = [torch.rand(3, dtype=torch.float16) for _ in range(2)]
    grads = [[torch.rand(3, dtype=torch.float16) for _ in range(2)] for _ in range(3)]
    results = run_paths(weights0, grads, momentum=0.9, wd=0.01, multi_precision=True,
                        param_idx2name={0: "fc_bias", 1: "fc_weight"})
    fused = {path: value for path, value in results.items() if path != "step"}
    assert_all_paths_equal(fused)
    weights, states = fused["fused_agg4"]
    for w, (master, _) in zip(weights, states.values()):
        assert torch.equal(master.half(), w)


def test_b2_more_than_60_params_in_one_call():
    # MXNet segfaults past 60 weights in one aggregated call; here the count is unlimited.
    torch.manual_seed(1)
    weights0 = [torch.rand(2) for _ in range(70)]
    grads = [[torch.rand(2) for _ in range(70)]]
    assert_all_paths_equal(run_paths(weights0, grads, momentum=0.9, wd=1e-3))


@pytest.mark.parametrize("rescale_grad", [-0.5, 0.0])
def test_b3_negative_or_zero_rescale_grad_uses_the_python_path_rule(rescale_grad):
    # MXNet's aggregated path multiplies |g| by the signed rescale_grad and treats 0 as valid;
    # the rule here is its python path's on every path: |rescale_grad| * |g|, 0 -> plain lr.
    w0 = [torch.tensor([1.0, 2.0])]
    g = torch.tensor([0.5, -1.0])
    results = run_paths(w0, [[g]], learning_rate=0.1, wd=0.5, eta=0.01, rescale_grad=rescale_grad)
    assert_all_paths_equal(results)
    if rescale_grad == 0.0:
        lam = 1.0
    else:
        w_norm, g_norm = 5 ** 0.5, abs(rescale_grad) * 1.25 ** 0.5
        lam = 0.01 * w_norm / (g_norm + 0.5 * w_norm + 1e-8)
    expected = w0[0] - 0.1 * lam * (rescale_grad * g + 0.5 * w0[0])
    torch.testing.assert_close(results["fused_agg4"][0][0], expected)


def test_b3_infinite_gradient_gives_the_plain_lr_step_on_every_path():
    w0 = [torch.tensor([1.0, 2.0, 3.0])]
    g = torch.tensor([float("inf"), 1.0, 0.0])
    results = run_paths(w0, [[g]], learning_rate=0.1, eta=0.01)
    assert_all_paths_equal(results)
    # lam falls back to 1 (no eta): w - 0.1 * g
    torch.testing.assert_close(results["step"][0][0], torch.tensor([-float("inf"), 1.9, 3.0]))


def test_negative_momentum_is_plain_sgd_on_every_path():
    torch.manual_seed(2)
    w0 = [torch.rand(4)]
    grads = [[torch.rand(4)] for _ in range(2)]
    results = run_paths(w0, grads, momentum=-0.5, wd=0.1)
    assert_all_paths_equal(results)
    plain = run_paths(w0, grads, momentum=0.0, wd=0.1)
    torch.testing.assert_close(results["step"][0][0], plain["step"][0][0])
    assert not results["step"][1][0].any()  # the buffer exists (momentum != 0) and stays zero


def test_negative_clip_gradient_does_not_clip_on_any_path():
    torch.manual_seed(3)
    w0 = [torch.rand(4)]
    grads = [[torch.rand(4) * 3]]
    results = run_paths(w0, grads, clip_gradient=-0.1)
    assert_all_paths_equal(results)
    torch.testing.assert_close(results["step"][0][0], run_paths(w0, grads)["step"][0][0])


def test_zero_clip_gradient_clips_to_zero():
    w0 = [torch.tensor([1.0, 2.0])]
    results = run_paths(w0, [[torch.tensor([1.0, -1.0])]], clip_gradient=0.0, wd=0.1, learning_rate=1.0,
                        param_idx2name={0: "b_bias"})
    assert_all_paths_equal(results)
    torch.testing.assert_close(results["step"][0][0], w0[0] * 0.9)


def test_mixed_dtypes_in_one_call():
    # MXNet's aggregated kernels need one dtype per call, and its fused path decides
    # multi_precision from weights[0] alone; here each weight is handled by its own dtype.
    torch.manual_seed(4)
    w0 = [torch.rand(3), torch.rand(3, dtype=torch.float16), torch.rand(3, dtype=torch.float64)]
    grads = [[torch.rand(3), torch.rand(3, dtype=torch.float16), torch.rand(3, dtype=torch.float64)]]
    results = run_paths(w0, grads, momentum=0.9, multi_precision=True)
    assert_all_paths_equal(results)
    assert [w.dtype for w in results["fused_inf"][0]] == [torch.float32, torch.float16, torch.float64]
