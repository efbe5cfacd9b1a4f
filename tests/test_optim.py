"""larsopt.LARS as a torch.optim.Optimizer: gradients untouched, state_dict, schedulers, closure,
maximize, tensor lr, named params, and every bad input (a ValueError naming argument and value)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import larsopt

# Tiny tensors: one thread is faster and keeps the run time independent of machine load.
pytestmark = pytest.mark.usefixtures("single_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 2, 6, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def _train_step(model, opt, step):
    x, y = _batch(step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _groups(model):
    # Two groups with different settings, as a typical LARS set-up has.
    return larsopt.param_groups(model, weight_decay=1e-3, exclude="norm_and_bias")


RICH_OPTIONS = [
    dict(momentum=0.9),
    dict(momentum=0.9, momentum_form="torch", nesterov=True, trust_norm="update", trust_clip=True),
    dict(momentum=0.0, rescale_grad=0.5, clip_gradient=0.1, maximize=True),
    dict(momentum=0.8, momentum_form="paper", nesterov=True, rescale_grad=-2.0, clip_gradient=0.0, weight_decay=0.1),
]


# --------------------------------------------------------------------------------------------
# p.grad is never modified
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", RICH_OPTIONS)
@pytest.mark.parametrize("impl", list(larsopt.functional.IMPLS))
def test_grad_is_not_modified(options, impl):
    model = _model()
    opt = larsopt.LARS(_groups(model), lr=0.5, eta=0.02, impl=impl, **options)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {p: (p.grad, p.grad.clone()) for p in model.parameters()}
        opt.step()
        for p, (grad, saved) in grads.items():
            assert p.grad is grad  # the same tensor object ...
            assert torch.equal(p.grad, saved)  # ... with the same values


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def test_momentum_buffer_absent_when_momentum_is_zero():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=0.1, momentum=0.0, weight_decay=1e-4)
    for step in range(2):
        _train_step(model, opt, step)
    for p in model.parameters():
        assert "momentum_buffer" not in opt.state.get(p, {})
    assert all("momentum_buffer" not in s for s in opt.state_dict()["state"].values())


def test_momentum_buffer_present_when_momentum_is_nonzero():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=0.1, momentum=0.9)
    _train_step(model, opt, 0)
    for p in model.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape and buf.dtype == p.dtype


@pytest.mark.parametrize("options", RICH_OPTIONS)
@pytest.mark.parametrize("via_torch_save", [False, True])
def test_state_dict_resume_is_bit_identical(options, via_torch_save):
    total, k = 6, 3
    lrs = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]  # lr changes: the momentum form matters

    # Uninterrupted run.
    model_a = _model()
    opt_a = larsopt.LARS(_groups(model_a), lr=lrs[0], eta=0.02, **options)
    for step in range(total):
        for group in opt_a.param_groups:
            group["lr"] = lrs[step]
        _train_step(model_a, opt_a, step)

    # k steps, save, fresh model + optimizer, load, continue.
    model_b = _model()
    opt_b = larsopt.LARS(_groups(model_b), lr=lrs[0], eta=0.02, **options)
    for step in range(k):
        for group in opt_b.param_groups:
            group["lr"] = lrs[step]
        _train_step(model_b, opt_b, step)
    model_state, opt_state = model_b.state_dict(), opt_b.state_dict()
    if via_torch_save:
        buffer = io.BytesIO()
        torch.save({"model": model_state, "opt": opt_state}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        model_state, opt_state = loaded["model"], loaded["opt"]
    else:
        model_state, opt_state = copy.deepcopy(model_state), copy.deepcopy(opt_state)
    del model_b, opt_b

    model_c = _model(seed=123)  # different initial weights: everything must come from the checkpoint
    model_c.load_state_dict(model_state)
    opt_c = larsopt.LARS(_groups(model_c), lr=99.0, eta=0.5, momentum=0.5)  # settings from the checkpoint
    opt_c.load_state_dict(opt_state)
    for step in range(k, total):
        for group in opt_c.param_groups:
            group["lr"] = lrs[step]
        _train_step(model_c, opt_c, step)

    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert sa["param_groups"] == sc["param_groups"]
    assert sa["state"].keys() == sc["state"].keys()
    for key in sa["state"]:
        for name, value in sa["state"][key].items():
            assert torch.equal(value, sc["state"][key][name]), (key, name)


def test_state_dict_round_trip_with_tensor_lr():
    def build():
        w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        return w, larsopt.LARS([w], lr=torch.tensor(0.3), momentum=0.9, eta=0.1)

    w_a, opt_a = build()
    w_b, opt_b = build()
    for step in range(4):
        grad = torch.tensor([0.1, 0.2, -0.3]) * (step + 1)
        if step == 2:
            w_c, opt_c = build()
            buffer = io.BytesIO()
            torch.save(opt_b.state_dict(), buffer)
            buffer.seek(0)
            opt_c.load_state_dict(torch.load(buffer, weights_only=True))
            with torch.no_grad():
                w_c.copy_(w_b)
            w_b, opt_b = w_c, opt_c
        for w, opt in ((w_a, opt_a), (w_b, opt_b)):
            w.grad = grad.clone()
            opt.step()
    assert torch.equal(w_a, w_b)


# --------------------------------------------------------------------------------------------
# LR schedulers, closure, maximize, tensor lr
# --------------------------------------------------------------------------------------------


def _replay_with_recorded_lrs(make_scheduler, steps=8, tensor_lr=False, **options):
    """Run once with the scheduler, recording every group's lr and momentum at each step; run
    again setting those by hand. The scheduler must have driven the step (bit-identical)."""
    model_a = _model()
    lr = torch.tensor(0.2) if tensor_lr else 0.2
    opt_a = larsopt.LARS(_groups(model_a), lr=lr, momentum=0.9, eta=0.05, **options)
    sched = make_scheduler(opt_a)
    record = []
    for step in range(steps):
        record.append([(float(g["lr"]), g["momentum"]) for g in opt_a.param_groups])
        _train_step(model_a, opt_a, step)
        sched.step()
    model_b = _model()
    opt_b = larsopt.LARS(_groups(model_b), lr=0.2, momentum=0.9, eta=0.05, **options)
    for step in range(steps):
        for group, (lr, momentum) in zip(opt_b.param_groups, record[step]):
            group["lr"], group["momentum"] = lr, momentum
        _train_step(model_b, opt_b, step)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    return record


def test_step_lr_scheduler():
    record = _replay_with_recorded_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    assert [r[0][0] for r in record] == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_lambda_lr_scheduler_per_group():
    record = _replay_with_recorded_lrs(
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0 / (s + 1), lambda s: 0.5 ** s]),
        momentum_form="torch",
    )
    assert record[3][0][0] == pytest.approx(0.2 / 4) and record[3][1][0] == pytest.approx(0.2 / 8)


def test_one_cycle_lr_scheduler_drives_lr_and_momentum():
    record = _replay_with_recorded_lrs(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10), steps=10
    )
    lrs = [r[0][0] for r in record]
    assert max(lrs) == pytest.approx(1.0, rel=1e-6) and lrs[0] < 0.1 and lrs[-1] < lrs[3]
    assert len({r[0][1] for r in record}) > 1  # OneCycleLR cycles the momentum too


def test_scheduler_with_tensor_lr_keeps_a_tensor():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=torch.tensor(0.2), momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        _train_step(model, opt, step)
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.025)
    _replay_with_recorded_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), tensor_lr=True)


def test_lr_drives_the_update_in_excluded_group():
    # lars=False, no wd, no momentum: w -= lr * g exactly, so the lr actually used is visible.
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = larsopt.LARS([{"params": [w], "lars": False}], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for step in range(3):
        before = w.detach().clone()
        w.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        sched.step()
        torch.testing.assert_close(before - w.detach(), torch.full((3,), 0.5 * 0.5 ** step, dtype=torch.float64),
                                   rtol=1e-15, atol=0)


def test_closure_is_called_and_its_loss_returned():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=0.5, momentum=0.9, eta=0.05)
    x, y = _batch(0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # the step runs under no_grad, the closure must get grad back
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # The closure's gradients were the ones used: same as computing them first, then step().
    model_b = _model()
    opt_b = larsopt.LARS(model_b.parameters(), lr=0.5, momentum=0.9, eta=0.05)
    _train_step(model_b, opt_b, 0)
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", RICH_OPTIONS)
def test_maximize_is_minimizing_the_negated_gradient(options):
    results = []
    for maximize in (False, True):
        w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64, requires_grad=True)
        opt = larsopt.LARS([w], lr=0.3, eta=0.05, **{**options, "maximize": maximize})
        for step in range(3):
            g = torch.tensor([[0.1, 0.4], [-0.2, 0.3]], dtype=torch.float64) * (step + 1)
            w.grad = g if maximize else -g
            opt.step()
        results.append(w.detach())
    assert torch.equal(results[0], results[1])


def test_maximize_increases_the_objective():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = larsopt.LARS([w], lr=0.1, maximize=True, eta=0.1)
    values = []
    for _ in range(5):
        opt.zero_grad()
        objective = -(w**2).sum()  # maximum at 0
        objective.backward()
        values.append(objective.item())
        opt.step()
    assert values == sorted(values) and values[-1] > values[0]


@pytest.mark.parametrize("momentum_form", ["paper", "torch"])
@pytest.mark.parametrize("trust_clip", [False, True])
def test_tensor_lr_equals_float_lr(momentum_form, trust_clip):
    results = []
    for lr in (0.25, torch.tensor(0.25, dtype=torch.float64)):
        w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        opt = larsopt.LARS([w], lr=lr, momentum=0.9, momentum_form=momentum_form, trust_clip=trust_clip, eta=0.2,
                           weight_decay=0.01)
        for step in range(3):
            w.grad = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64) * (step + 1)
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-15, atol=0)


def test_step_without_any_grad_changes_nothing():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not any(opt.state.values())


# --------------------------------------------------------------------------------------------
# Named params
# --------------------------------------------------------------------------------------------


def test_named_parameters_are_accepted_and_names_kept():
    model = _model()
    opt = larsopt.LARS(model.named_parameters(), lr=0.1, momentum=0.9)
    names = [name for name, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters()))
    _train_step(model, opt, 0)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names


def test_named_parameters_in_groups():
    model = _model()
    named = list(model.named_parameters())
    opt = larsopt.LARS([{"params": named[:2], "lars": False}, {"params": named[2:]}], lr=0.1)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in named[:2]]
    assert opt.param_groups[1]["param_names"] == [n for n, _ in named[2:]]
    _train_step(model, opt, 0)


def test_named_and_plain_optimizers_give_the_same_numbers():
    model_a, model_b = _model(), _model()
    opt_a = larsopt.LARS(model_a.named_parameters(), lr=0.3, momentum=0.9, eta=0.05)
    opt_b = larsopt.LARS(model_b.parameters(), lr=0.3, momentum=0.9, eta=0.05)
    for step in range(2):
        _train_step(model_a, opt_a, step)
        _train_step(model_b, opt_b, step)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and its value
# --------------------------------------------------------------------------------------------


def _param():
    return torch.zeros(3, requires_grad=True)


@pytest.mark.parametrize(
    "argument,value",
    [
        ("lr", -0.1), ("lr", math.nan), ("lr", math.inf),
        ("eta", -1e-3), ("eta", math.nan),
        ("epsilon", -1e-8),
        ("weight_decay", -1e-4), ("weight_decay", math.nan),
        ("momentum", -0.1), ("momentum", 1.0), ("momentum", 1.5), ("momentum", math.nan),
        ("momentum_form", "nesterov"), ("momentum_form", "PAPER"),
        ("trust_norm", "max"), ("trust_norm", None),
        ("impl", "cuda-magic"),
        ("clip_gradient", -1.0), ("clip_gradient", math.nan),
        ("rescale_grad", math.nan), ("rescale_grad", math.inf),
    ],
)
def test_bad_hyperparameter_raises_value_error(argument, value):
    with pytest.raises(ValueError) as info:
        larsopt.LARS([_param()], **{argument: value})
    message = str(info.value)
    assert argument in message and repr(value) in message, message
    # The same check for a param group (per-group settings).
    with pytest.raises(ValueError, match=argument):
        larsopt.LARS([{"params": [_param()], argument: value}])
    opt = larsopt.LARS([_param()])
    with pytest.raises(ValueError, match=argument):
        opt.add_param_group({"params": [_param()], argument: value})
    assert len(opt.param_groups) == 1


def test_negative_tensor_lr_raises():
    with pytest.raises(ValueError, match="lr"):
        larsopt.LARS([_param()], lr=torch.tensor(-0.1))


def test_lr_tensor_must_be_0d():
    # "lr may be a float or a 0-d tensor": a 1-element 1-D tensor is not 0-d (with a 0-d param the
    # step cannot even broadcast it back), so it must be refused up front.
    with pytest.raises(ValueError, match="lr"):
        larsopt.LARS([_param()], lr=torch.tensor([0.1]))


def test_infinite_tensor_lr_raises_like_infinite_float_lr():
    # A float lr of inf is refused ("expected a finite number >= 0"); a tensor lr must be too.
    with pytest.raises(ValueError, match="lr"):
        larsopt.LARS([_param()], lr=math.inf)
    with pytest.raises(ValueError, match="lr"):
        larsopt.LARS([_param()], lr=torch.tensor(math.inf))


def test_nesterov_without_momentum_raises():
    with pytest.raises(ValueError, match="nesterov") as info:
        larsopt.LARS([_param()], nesterov=True, momentum=0.0)
    assert "momentum" in str(info.value)


def test_empty_params_raise():
    with pytest.raises(ValueError, match="param"):
        larsopt.LARS([])
    with pytest.raises(ValueError, match="param"):
        larsopt.LARS(iter([]))


def test_param_in_two_groups_raises_naming_it():
    model = _model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError) as info:
        larsopt.LARS([{"params": named[:3]}, {"params": named[2:]}])
    # The issue: a ValueError naming the argument and its value: which param is given twice.
    assert named[2][0] in str(info.value), str(info.value)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_param_twice_in_one_group_raises():
    p = _param()
    with pytest.raises(ValueError, match="twice|more than one"):
        larsopt.LARS([p, p])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_params_raise(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError) as info:
        larsopt.LARS([p])
    assert str(dtype) in str(info.value)
    with pytest.raises(ValueError, match="emb.count"):
        larsopt.LARS([("emb.weight", _param()), ("emb.count", p)])


def test_unknown_group_key_is_kept_as_metadata():
    # torch keeps any key in a group (layer-wise lr decay's lr_scale, initial_lr); only a key one
    # edit away from a setting warns (tests/test_hardening_optimizer.py)
    optimizer = larsopt.LARS([{"params": [_param()], "lerning_rate": 0.1}])
    assert optimizer.param_groups[0]["lerning_rate"] == 0.1


def test_group_without_params_raises():
    # Not one of the listed cases, so any clear error naming the missing key is accepted.
    with pytest.raises((ValueError, KeyError), match="params"):
        larsopt.LARS([{"lr": 0.1}])


def test_bad_boolean_options_raise():
    for name in ("nesterov", "trust_clip", "maximize", "lars"):
        with pytest.raises(ValueError, match=name):
            larsopt.LARS([{"params": [_param()], name: "yes"}], momentum=0.9)


# --------------------------------------------------------------------------------------------
# load_state_dict of a mismatched optimizer: a clear error, optimizer unchanged
# --------------------------------------------------------------------------------------------


def _trained_lars(groups=2, momentum=0.9):
    model = _model()
    params = list(model.parameters())
    split = [{"params": params[:2], "lars": False}, {"params": params[2:]}] if groups == 2 else params
    opt = larsopt.LARS(split, lr=0.1, momentum=momentum, eta=0.01)
    _train_step(model, opt, 0)
    return model, opt


def _snapshot(opt):
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in opt.param_groups]
    return state, groups


def _assert_unchanged(opt, snapshot):
    state, groups = snapshot
    assert set(opt.state.keys()) == set(state.keys())
    for p, s in state.items():
        assert opt.state[p].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v)
    assert len(opt.param_groups) == len(groups)
    for now, before in zip(opt.param_groups, groups):
        assert now.keys() == before.keys()
        for k in before:
            if k == "params":
                assert all(a is b for a, b in zip(now[k], before[k])) and len(now[k]) == len(before[k])
            else:
                assert now[k] == before[k], k


def _other_optimizer_state(kind, model):
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    return opt.state_dict()


def _mismatched_states():
    cases = {}
    _, one_group = _trained_lars(groups=1)
    cases["different group count"] = one_group.state_dict()
    model, opt = _trained_lars()
    fewer = larsopt.LARS([{"params": list(model.parameters())[:1], "lars": False},
                          {"params": list(model.parameters())[2:]}], lr=0.1, momentum=0.9)
    _train_step(model, fewer, 0)
    cases["different param count"] = fewer.state_dict()
    cases["SGD state"] = _other_optimizer_state("sgd", _model())
    cases["Adam state"] = _other_optimizer_state("adam", _model())
    wrong_shape = copy.deepcopy(opt.state_dict())
    key = next(iter(wrong_shape["state"]))
    buf = wrong_shape["state"][key]["momentum_buffer"]
    wrong_shape["state"][key]["momentum_buffer"] = torch.zeros(buf.numel() + 1)
    cases["wrong buffer shape"] = wrong_shape
    not_a_tensor = copy.deepcopy(opt.state_dict())
    not_a_tensor["state"][key]["momentum_buffer"] = [0.0] * buf.numel()
    cases["buffer not a tensor"] = not_a_tensor
    bad_value = copy.deepcopy(opt.state_dict())
    bad_value["param_groups"][1]["lr"] = -1.0
    cases["negative lr"] = bad_value
    unknown_id = copy.deepcopy(opt.state_dict())
    unknown_id["state"][999] = {"momentum_buffer": torch.zeros(3)}
    cases["state for an unknown param"] = unknown_id
    cases["not a state dict"] = {"weights": [1, 2, 3]}
    return cases


MISMATCHED = list(_mismatched_states())
# What a clear message must mention for each case.
MISMATCH_MESSAGE = {
    "different group count": "group",
    "different param count": "param",
    "SGD state": "optimizer|eta|LARS",
    "Adam state": "optimizer|eta|LARS",
    "wrong buffer shape": "shape",
    "buffer not a tensor": "momentum_buffer",
    "negative lr": "lr",
    "state for an unknown param": "param",
    "not a state dict": "state",
}


@pytest.mark.parametrize("case", MISMATCHED)
def test_load_mismatched_state_raises_and_leaves_optimizer_unchanged(case):
    states = _mismatched_states()
    model, opt = _trained_lars()
    _train_step(model, opt, 1)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=MISMATCH_MESSAGE[case]):
        opt.load_state_dict(states[case])
    _assert_unchanged(opt, snapshot)
    # Still works after the refused load.
    _train_step(model, opt, 2)


def test_load_sgd_state_into_lars_says_other_optimizer():
    model, opt = _trained_lars(groups=1)
    with pytest.raises(ValueError, match="optimizer"):
        opt.load_state_dict(_other_optimizer_state("sgd", _model()))
