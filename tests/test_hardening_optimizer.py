"""Issue 15, the optimizer's corners: copies of a whole LARS, load hooks, extra group keys, atomic
steps and malformed state dicts."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import larsopt
from random_params import random_params, set_random_grads


# 1. copies of the whole optimizer ------------------------------------------------------------

def _deepcopy(optimizer):
    return copy.deepcopy(optimizer)


def _pickle(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


def _torch_save(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [_deepcopy, _pickle, _torch_save])
@pytest.mark.parametrize("seeded", [True, False])
def test_a_copy_steps_exactly_like_the_original(make_copy, seeded):
    params = random_params(dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(7) if seeded else None
    original = larsopt.LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4, stochastic_rounding=True,
                            generator=generator)
    set_random_grads(params, 1)
    original.step()
    clone = make_copy(original)
    clone_params = clone.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(params, clone_params))
    for step in range(2, 5):
        set_random_grads(params, step)
        set_random_grads(clone_params, step)
        state = torch.random.get_rng_state()
        original.step()
        torch.random.set_rng_state(state)  # (unseeded: both draw from the same global state)
        clone.step()
    for a, b in zip(params, clone_params):
        assert torch.equal(a, b)
    assert torch.equal(original.state[params[0]]["momentum_buffer"], clone.state[clone_params[0]]["momentum_buffer"])
    if seeded:
        assert clone.generator is not generator  # its own generator, in the state the original's had
        assert torch.equal(clone.generator.get_state(), generator.get_state())


def test_an_optimizer_pickled_without_a_generator_loads_with_none():
    optimizer = larsopt.LARS(random_params(), lr=0.1)
    state = optimizer.__getstate__()
    del state["generator"]
    restored = larsopt.LARS.__new__(larsopt.LARS)
    restored.__setstate__(state)
    assert restored.generator is None
    set_random_grads(restored.param_groups[0]["params"], 0)
    restored.step()


# 9, 10, 12, 13. LARS conventions ------------------------------------------------------------

def test_a_load_pre_hook_migrates_a_checkpoint_before_it_is_checked():
    params = random_params()
    sgd = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    set_random_grads(params, 0)
    sgd.step()
    optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lacks the LARS settings"):
        optimizer.load_state_dict(sgd.state_dict())
    calls = []

    def migrate(opt, state_dict):
        calls.append("pre")
        groups = [{**opt.defaults, **{k: v for k, v in group.items() if k in ("params", "lr", "momentum")}}
                  for group in state_dict["param_groups"]]
        return {"state": state_dict["state"], "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(migrate)
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("post", opt.param_groups[0]["lr"])))
    optimizer.load_state_dict(sgd.state_dict())
    assert calls == ["pre", ("post", 0.3)]  # each hook once, the post-hook after the whole load
    torch.testing.assert_close(optimizer.state[params[0]]["momentum_buffer"], sgd.state[params[0]]["momentum_buffer"])


def test_extra_group_keys_are_kept_and_near_misses_warn():
    params = random_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = larsopt.LARS([{"params": params[:2], "name": "body", "layer_id": 3, "lr_scale": 0.5,
                                   "initial_lr": 0.2}, {"params": params[2:], "name": "head", "initial_lr": 0.1}], lr=0.1)
    assert optimizer.param_groups[0]["lr_scale"] == 0.5 and optimizer.param_groups[1]["name"] == "head"
    set_random_grads(params, 0)
    optimizer.step()
    loaded = larsopt.LARS([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    loaded.load_state_dict(optimizer.state_dict())
    assert loaded.param_groups[0]["initial_lr"] == 0.2 and loaded.param_groups[0]["layer_id"] == 3
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, last_epoch=0)  # needs initial_lr
    scheduler.step()
    for typo, meant in (("momentun", "momentum"), ("weight_decy", "weight_decay"), ("Nesterov", "nesterov"),
                        ("ets", "eta")):
        with pytest.warns(UserWarning, match=f"{typo!r}.*{meant!r}"):
            larsopt.LARS([{"params": random_params(), typo: 0.5}])


def test_a_failing_step_changes_nothing():
    dense = random_params()
    embedding = torch.nn.Parameter(torch.randn(10, 4, 3))
    optimizer = larsopt.LARS([{"params": dense, "multi_precision": True}, {"params": [embedding]}], lr=0.1,
                             momentum=0.9)
    set_random_grads(dense, 0)
    embedding.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2], [0, 1]]), torch.randn(2, 3), (10, 4, 3))
    before = [p.detach().clone() for p in dense]
    with pytest.raises(RuntimeError, match="sparse_dim=2.*group 1"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(dense, before))
    assert all(not optimizer.state.get(p) for p in dense)


def _malformed(state_dict):
    good_group = state_dict["param_groups"][0]
    good_state = next(iter(state_dict["state"].values()))
    meta = {"momentum_buffer": torch.empty(good_state["momentum_buffer"].shape, device="meta")}
    integer = {"momentum_buffer": torch.zeros(good_state["momentum_buffer"].shape, dtype=torch.int64)}
    return {
        "not a dict": [1, 2],
        "state is a list": {"state": [good_state], "param_groups": state_dict["param_groups"]},
        "param_groups is a dict": {"state": state_dict["state"], "param_groups": good_group},
        "a group is a list": {"state": state_dict["state"], "param_groups": [list(good_group)]},
        "a group without params": {"state": {}, "param_groups": [{k: v for k, v in good_group.items()
                                                                  if k != "params"}]},
        "unhashable param id": {"state": {}, "param_groups": [{**good_group,
                                                              "params": [[0]] + good_group["params"][1:]}]},
        "a param id twice": {"state": {}, "param_groups": [{**good_group, "params": [0, 0, 1]}]},
        "a state that is a list": {"state": {0: [1.0]}, "param_groups": state_dict["param_groups"]},
        "a meta tensor": {"state": {0: meta}, "param_groups": state_dict["param_groups"]},
        "an integer buffer": {"state": {0: integer}, "param_groups": state_dict["param_groups"]},
        "a string lr": {"state": {}, "param_groups": [{**good_group, "lr": "fast"}]},
    }


def test_malformed_state_dicts_raise_value_error_and_change_nothing():
    params = random_params()
    optimizer = larsopt.LARS(params, lr=0.1, momentum=0.9)
    set_random_grads(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    for case, state_dict in _malformed(copy.deepcopy(saved)).items():
        with pytest.raises(ValueError, match="Invalid state_dict"):
            optimizer.load_state_dict(state_dict)
        after = optimizer.state_dict()
        assert after["param_groups"] == saved["param_groups"], case
        for key, state in saved["state"].items():
            assert torch.equal(after["state"][key]["momentum_buffer"], state["momentum_buffer"]), case
