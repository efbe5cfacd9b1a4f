"""``capturable=True``: a LARS step captured in a CUDA graph and replayed gives the eager steps.

The CUDA tests run where a GPU is present; the checks that guard a capture (tensor lr, devices,
no state created inside a graph, load_state_dict in place) run everywhere.
"""

from __future__ import annotations

import pytest
import torch

import larsopt
from larsopt import optim

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (4, 4, 3, 3), (3,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
            for shape in shapes]


def test_float_lr_is_refused():
    with pytest.raises(ValueError, match=r"Invalid lr: 0\.1 with capturable=True.*0-d tensor"):
        larsopt.LARS(_params(), lr=0.1, capturable=True)
    optimizer = larsopt.LARS(_params()[:2], lr=torch.tensor(0.1), capturable=True)
    with pytest.raises(ValueError, match=r"Invalid lr: 0\.5 with capturable=True"):
        optimizer.add_param_group({"params": _params()[2:], "lr": 0.5})


def test_capturable_must_be_a_bool():
    with pytest.raises(ValueError, match=r"Invalid capturable: 'yes'; expected True or False"):
        larsopt.LARS(_params(), lr=torch.tensor(0.1), capturable="yes")


def _capturing(monkeypatch) -> None:
    """Make the step believe a CUDA graph capture is underway (the checks are device-independent)."""
    monkeypatch.setattr(optim, "_capturing", lambda: True)


def test_eager_steps_need_no_gpu():
    """capturable only matters while capturing: eager steps run anywhere (dynamo also sets it)."""
    params, reference = _params(), _params()
    for p, q in zip(params, reference):
        p.grad = q.grad = torch.ones_like(p)
    larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True).step()
    larsopt.LARS(reference, lr=0.1, momentum=0.9).step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


def test_capture_without_capturable_raises(monkeypatch):
    params = _params()
    optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    _capturing(monkeypatch)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="captured in a CUDA graph, but param group 0 has capturable=False"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("multi_precision", [False, True])
def test_state_created_inside_a_capture_raises(monkeypatch, multi_precision):
    """A momentum buffer (or master) made inside a graph would be re-zeroed at every replay."""
    params = _params(dtype=torch.bfloat16 if multi_precision else torch.float32)
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, multi_precision=multi_precision,
                             capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    _capturing(monkeypatch)
    name = "master_param" if multi_precision else "momentum_buffer"
    with pytest.raises(RuntimeError, match=rf"{name} of param #0 .* of group 0 would be created inside the CUDA "
                                           r"graph.*warm-up"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, _params(dtype=params[0].dtype)))


def test_cpu_params_are_refused_when_capturing(monkeypatch):
    params = _params()
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # warm-up: the state exists
    _capturing(monkeypatch)
    with pytest.raises(ValueError, match=r"capturable: True for param #0 .* of group 0 on cpu; CUDA graphs need "
                                         "CUDA params"):
        optimizer.step()


def test_python_lr_is_refused_when_capturing(monkeypatch):
    """A Python lr set later (or by dynamo's own capturable flag) would be frozen in the graph."""
    optimizer = larsopt.LARS(_params(), lr=torch.tensor(0.1), capturable=True)
    optimizer.param_groups[0]["lr"] = 0.05
    _capturing(monkeypatch)
    with pytest.raises(ValueError, match=r"Invalid lr: 0\.05 in param group 0 while a CUDA graph is captured"):
        optimizer.step()


def _saved_state(lr: float, fill: float) -> dict:
    params = _params()
    optimizer = larsopt.LARS(params, lr=lr, momentum=0.9)
    for p in params:
        optimizer.state[p]["momentum_buffer"] = torch.full_like(p, fill)
    return optimizer.state_dict()


def _as_after_a_capture(optimizer: larsopt.LARS) -> None:
    """What a successful capture records (capturing needs CUDA)."""
    optimizer._graph_captured = True


def test_load_state_dict_keeps_the_lr_tensor_and_state_tensors():
    """A graph captured before load_state_dict reads the same lr and buffer tensors afterwards."""
    params = _params()
    lr = torch.tensor(0.1)
    optimizer = larsopt.LARS(params, lr=lr, momentum=0.9, capturable=True)
    optimizer.load_state_dict(_saved_state(0.25, 1.0))
    _as_after_a_capture(optimizer)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
    optimizer.load_state_dict(_saved_state(0.5, 2.0))
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.5
    assert optimizer.param_groups[0]["capturable"] is True
    for p, buffer in zip(params, buffers):
        assert optimizer.state[p]["momentum_buffer"] is buffer
        assert torch.equal(buffer, torch.full_like(p, 2.0))


def test_load_overwrites_state_in_place_across_dtypes():
    """A bfloat16 buffer saved without masters goes into the float32 buffer a graph holds."""
    params = _params(dtype=torch.bfloat16)
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    for p in params:
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
    _as_after_a_capture(optimizer)
    source = larsopt.LARS(_params(dtype=torch.bfloat16), lr=0.3, momentum=0.9)
    for p in source.param_groups[0]["params"]:
        source.state[p]["momentum_buffer"] = torch.full_like(p, 1.5)
    optimizer.load_state_dict(source.state_dict())
    for p, buffer in zip(params, buffers):
        assert optimizer.state[p]["momentum_buffer"] is buffer
        assert buffer.dtype == torch.float32 and torch.equal(buffer, torch.full_like(buffer, 1.5))


def test_load_lacking_a_captured_state_tensor_raises():
    params = _params()
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    optimizer.load_state_dict(_saved_state(0.25, 1.0))
    saved = _saved_state(0.5, 2.0)
    del saved["state"][1]
    fresh = larsopt.LARS(_params(), lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    fresh.load_state_dict(_saved_state(0.25, 1.0))
    fresh.load_state_dict(saved)  # no graph captured yet: nothing to keep
    _as_after_a_capture(optimizer)
    with pytest.raises(ValueError, match=r"param #1 .* of group 0 has \['momentum_buffer'\] here and not in the "
                                         "saved state; with capturable=True"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"].item() == 0.25
    assert torch.equal(optimizer.state[params[1]]["momentum_buffer"], torch.full_like(params[1], 1.0))


def _two_groups_sharing_one_lr(capturable: bool):
    params = _params()
    lr = torch.tensor(0.2)
    optimizer = larsopt.LARS([{"params": params[:2]}, {"params": params[2:]}], lr=lr, capturable=capturable)
    saved = larsopt.LARS([{"params": _params()[:2], "lr": 0.1}, {"params": _params()[2:], "lr": 0.01}])
    return optimizer, lr, saved.state_dict()


def test_groups_sharing_an_lr_tensor_keep_their_own_saved_lrs():
    optimizer, lr, saved = _two_groups_sharing_one_lr(capturable=False)
    optimizer.load_state_dict(saved)
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(value, torch.Tensor) for value in lrs)
    assert [value.item() for value in lrs] == pytest.approx([0.1, 0.01])
    assert lr.item() == pytest.approx(0.2)  # the shared tensor is not changed behind the groups' backs


def test_captured_groups_sharing_an_lr_tensor_refuse_different_saved_lrs():
    optimizer, lr, saved = _two_groups_sharing_one_lr(capturable=True)
    _as_after_a_capture(optimizer)
    with pytest.raises(ValueError, match=r"param group 0 shares its lr tensor .* different lrs \[0\.01, 0\.1\]"):
        optimizer.load_state_dict(saved)
    assert all(group["lr"] is lr for group in optimizer.param_groups) and lr.item() == pytest.approx(0.2)


def test_load_with_other_hyperparameters_after_a_capture_raises():
    """The graph has momentum, weight decay... as numbers: a state saved with others cannot be followed."""
    params = _params()
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    saved = larsopt.LARS(_params(), lr=0.1, momentum=0.5, weight_decay=0.3).state_dict()
    before = larsopt.LARS(_params(), lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    before.load_state_dict(saved)  # no graph yet: loads
    assert before.param_groups[0]["momentum"] == 0.5
    _as_after_a_capture(optimizer)
    with pytest.raises(ValueError, match=r"param group 0 was saved with momentum=0\.5, and this optimizer's captured "
                                         r"CUDA graph uses momentum=0\.9"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_state_of_another_dtype_is_refused_when_capturing(monkeypatch):
    params = _params()
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float64)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match=r"momentum_buffer of param #0 .* is torch\.float64 and the step needs "
                                           r"torch\.float32; converting it inside the CUDA graph"):
        optimizer.step()


def test_optimizer_pickled_before_capturable_existed():
    optimizer = larsopt.LARS(_params()[:2], lr=0.1)
    state = optimizer.__getstate__()
    del state["defaults"]["capturable"]
    for group in state["param_groups"]:
        del group["capturable"]
    restored = larsopt.LARS.__new__(larsopt.LARS)
    restored.__setstate__(state)
    restored.add_param_group({"params": _params()[2:]})
    assert [group["capturable"] for group in restored.param_groups] == [False, False]


def test_state_saved_before_capturable_existed_loads():
    saved = _saved_state(0.25, 1.0)
    for group in saved["param_groups"]:
        del group["capturable"]
    optimizer = larsopt.LARS(_params(), lr=torch.tensor(0.1), momentum=0.9, capturable=True)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["capturable"] is True


def _train_eagerly(params, grads_per_step, lrs, **options):
    lr = torch.tensor(lrs[0], device=params[0].device)
    optimizer = larsopt.LARS(params, lr=lr, **options)
    for grads, value in zip(grads_per_step, lrs):
        lr.fill_(value)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return params


@needs_cuda
@pytest.mark.parametrize("impl", ["auto", "foreach", "reference"])
@pytest.mark.parametrize("multi_precision", [False, True])
def test_cuda_graph_replay_matches_eager_steps(impl, multi_precision):
    dtype = torch.bfloat16 if multi_precision else torch.float32
    options = dict(momentum=0.9, weight_decay=1e-4, trust_clip=True, impl=impl, multi_precision=multi_precision)
    generator = torch.Generator().manual_seed(1)
    steps = 6
    grads_per_step = [[torch.randn(p.shape, generator=generator).to("cuda", dtype) for p in _params()]
                      for _ in range(steps)]
    lrs = [0.1 * 0.8 ** k for k in range(steps)]
    want = _train_eagerly(_params("cuda", dtype), grads_per_step, lrs, **options)

    params = _params("cuda", dtype)
    lr = torch.tensor(lrs[0], device="cuda")
    optimizer = larsopt.LARS(params, lr=lr, capturable=True, **options)
    for p in params:
        p.grad = torch.zeros_like(p)
    # Warm-up steps create the state; the first real step is then replayed from the graph.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, g in zip(params, grads_per_step[0]):
            p.grad.copy_(g)
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for grads, value in zip(grads_per_step[1:], lrs[1:]):
        lr.fill_(value)
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    for got, expected in zip(params, want):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@needs_cuda
def test_cuda_lr_on_another_device_is_refused_when_capturing(monkeypatch):
    params = _params("cuda")
    optimizer = larsopt.LARS(params, lr=torch.tensor(0.1), capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # eagerly, a CPU lr is fine
    _capturing(monkeypatch)
    with pytest.raises(ValueError, match=r"Invalid lr: a tensor on cpu for param #0 .* a CUDA graph cannot read"):
        optimizer.step()
