"""larsopt.LARS configured like MXNet 2.0 reproduces the MXNet golden numbers (cases A-G)."""

import json
from pathlib import Path

import pytest
import torch

import larsopt

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_mxnet_2.0.0b1.json").read_text())
CASES = [name for name in GOLDEN["cases"] if name[0] in "ABCDEFG"]


def _factor_lr(base_lr, step, factor, num_update):
    """MXNet's FactorScheduler(step, factor) at num_update (written out for the test)."""
    count, lr = 0, base_lr
    while num_update > count + step:
        count += step
        lr *= factor
    return lr


def _groups(case, weights):
    kw = case["kw"]
    names = case.get("names", [str(i) for i in range(len(weights))])
    lr_mult, wd_mult = {}, {}
    if case.get("note") == "set_lr_mult({0:2.0}); set_wd_mult({1:0.0})":
        lr_mult, wd_mult = {0: 2.0}, {1: 0.0}
    groups = []
    for i, (name, w) in enumerate(zip(names, weights)):
        groups.append({
            "params": [w],
            "lr_mult": lr_mult.get(i, 1.0),
            "lars": not name.endswith(("gamma", "beta", "bias")),
            "weight_decay": kw.get("wd", 0.0) * wd_mult.get(i, 1.0),
        })
    return groups


@pytest.mark.parametrize("name", CASES)
def test_golden_fused_agg1(name):
    case = GOLDEN["cases"][name]
    kw = case["kw"]
    weights = [torch.tensor(w, dtype=torch.float32, requires_grad=True) for w in case.get("weights", GOLDEN["W0"])]
    groups = _groups(case, weights)
    mults = [g.pop("lr_mult") for g in groups]
    opt = larsopt.LARS(
        groups,
        lr=0.1,
        momentum=kw.get("momentum", 0.0),
        eta=kw.get("eta", 0.001),
        epsilon=kw.get("epsilon", 1e-8),
        rescale_grad=kw.get("rescale_grad", 1.0),
        clip_gradient=kw.get("clip_gradient"),
    )
    grads = case.get("grads", GOLDEN["GS"])
    for step, expected in enumerate(case["out"]["fused_agg1"]):
        base_lr = _factor_lr(num_update=step + 1, **case["sched"]) if "sched" in case else kw["learning_rate"]
        for group, mult in zip(opt.param_groups, mults):
            group["lr"] = base_lr * mult
        step_grads = grads[step % len(grads)]
        before = [w.detach().clone() for w in weights]
        for w, g in zip(weights, step_grads):
            w.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        for w, b, e in zip(weights, before, expected):
            e = torch.tensor(e, dtype=torch.float32)
            scale = (e - b).abs().max().clamp_min(1e-30)
            assert ((w.detach() - e).abs().max() / scale) <= 1e-5, (name, step)
