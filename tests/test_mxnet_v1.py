"""larsopt.mxnet.v1.LARS reproduces MXNet 1.9.1's LARS on every way of calling it.

Data, recorded from the real ``mxnet==1.9.1`` CPU wheel:

* ``tests/data/golden_mxnet_1.9.1.json``: three cases, one ``update_multi_precision`` call with both indices
  per step (MXNet 1.x defaults);
* ``tests/data/golden_mxnet_1.9.1_extra.json`` (``tools/gen_mxnet1_goldens.py``, whose docstring describes the
  layout): those cases and many more, called with all indices at once, one index at a time, in explicit chunks
  and through the Updater with ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` 1, 2 and 4.

Tolerances (as for the MXNet 2.0 goldens): float32 weights and masters within ``1e-5`` of the size of the
update since the start plus one float32 ulp, float32 momentum within ``1e-5 * max|momentum|`` plus one ulp,
float16 within one float16 ulp (wider where MXNet 1.x's float16 arithmetic differs: ``FLOAT16_SQUARES_REL``,
``FLOAT16_WITHOUT_MASTER_REL``); ``num_update`` exactly, ``last_lr``/``cur_lr`` to 1e-12 relative.
"""

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx
from larsopt.mxnet import v1

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "golden_mxnet_1.9.1.json").read_text())
EXTRA = json.loads((DATA / "golden_mxnet_1.9.1_extra.json").read_text())
INPUTS = EXTRA["inputs"]
DT = {"float32": torch.float32, "float16": torch.float16}
REL = 1e-5
# MXNet 1.x's dense CPU path squares float16 elements in float16 for the norms (its GPU path and larsopt square
# float32 copies: docs/mxnet-compatibility.md), so on float16 inputs with dense gradients its trust ratios
# differ from larsopt's by up to a few 1e-4 relative: those records hold to this fraction of the update (and
# of the momentum). The "all_rows_sparse" records of the same configurations, where MXNet squares in float32,
# hold to the usual tolerance.
FLOAT16_SQUARES_REL = 2e-3
# float16 without multi_precision: MXNet 1.x's float16 kernels compute mom = (mu * mom - (lr * wd) * w) -
# lr * clip(r * g) in float16, the core mu * mom - lr * (clip(r * g) + wd * w); the roundings differ, by up
# to 0.4% of the update (and momentum) over these records.
FLOAT16_WITHOUT_MASTER_REL = 5e-3


class _Param:
    """Stands in for a gluon.Parameter in param_dict: only .lr_mult / .wd_mult are read."""

    def __init__(self, lr_mult, wd_mult):
        self.lr_mult = lr_mult
        self.wd_mult = wd_mult


@pytest.fixture(autouse=True)
def _no_aggregation_variable(monkeypatch):
    monkeypatch.delenv(v1.AGGREGATION_SIZE_VARIABLE, raising=False)


def make_optimizer(case, monkeypatch):
    kw = dict(case["kw"])
    if "names" in case:
        kw["param_idx2name"] = {i: n for i, n in case["names"]}
    if "sched" in case:
        kw["lr_scheduler"] = getattr(v1.lr_scheduler, case["sched"]["cls"])(**case["sched"]["args"])
    if "param_dict" in case:
        kw["param_dict"] = {i: _Param(lm, wm) for i, lm, wm in case["param_dict"]}
    if "aggregation" in case:
        monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, case["aggregation"])
    opt = v1.LARS(**kw)
    monkeypatch.delenv(v1.AGGREGATION_SIZE_VARIABLE, raising=False)
    for method, items in case.get("mult_calls", []):
        getattr(opt, method)({k: v for k, v in items})
    return opt


def make_grad(values, dtype, rows, device):
    dense = torch.tensor(values, dtype=DT[dtype], device=device)
    if rows is None:
        return dense
    rows = sorted(rows)
    indices = torch.tensor([rows], dtype=torch.int64, device=device).reshape(1, len(rows))
    return torch.sparse_coo_tensor(indices, dense[rows], size=dense.shape).coalesce()


def run(case, monkeypatch, *, driver=None, device="cpu"):
    """Call v1.LARS as MXNet was called for ``case`` (or with another ``driver``); yield (weights, states,
    optimizer) after each step."""
    inp = INPUTS[case["inputs"]]
    dtypes = inp["dtypes"]
    count = len(dtypes)
    indices = case["indices"]
    driver = driver or case["driver"]
    opt = make_optimizer(case, monkeypatch)
    weights = [torch.tensor(w, dtype=DT[dtypes[p]], device=device) for p, w in enumerate(inp["w"])]
    sparse = {} if case.get("all_rows_sparse") else {int(p): rows for p, rows in case.get("sparse", {}).items()}
    if driver == "updater":
        updater = v1.get_updater(opt)
    else:
        states = [opt.create_state_multi_precision(indices[p], weights[p]) for p in range(count)]
    for t in range(len(inp["g"])):
        if str(t) in case.get("set_lr", {}):
            opt.set_learning_rate(case["set_lr"][str(t)])
        grads = [make_grad(inp["g"][t][p], dtypes[p], sparse[p][t] if p in sparse else None, device)
                 for p in range(count)]
        if driver == "updater":
            updater(list(indices), grads, weights)
            states = [updater.states.get(i) for i in indices]
        elif driver == "per_index":
            for p in range(count):
                opt.update_multi_precision(indices[p], weights[p], grads[p], states[p])
        else:
            for call in case["chunks"] if driver == "chunks" else [list(range(count))]:
                opt.update_multi_precision([indices[p] for p in call], [weights[p] for p in call],
                                           [grads[p] for p in call], [states[p] for p in call])
        yield weights, states, opt


def as_float64(x):
    return x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def difference(what, got, expected, dtype, initial=None, rel=REL):
    """'' if ``got`` is within tolerance of ``expected``, else a description of the worst element.

    float32: ``rel`` of the update since ``initial`` (of ``|expected|`` without it) plus one ulp; float16: one
    ulp, plus that relative part where ``rel`` is wider than the usual ``REL``."""
    got = as_float64(got)
    expected = np.asarray(expected, np.float64).astype(dtype).astype(np.float64)
    if got.shape != expected.shape:
        return f"{what}: shape {got.shape} != {expected.shape}"
    diff = np.abs(got - expected)
    scale = np.abs(expected - np.asarray(initial, np.float64)) if initial is not None else np.abs(expected)
    if dtype == "float16":
        tol = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64)
        tol = tol + (rel * scale.max(initial=0.0) if rel > REL else 0.0)
    else:
        tol = rel * scale.max(initial=0.0) + np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    bad = ~(diff <= tol)
    if not bad.any():
        return ""
    i = np.unravel_index(np.argmax(np.where(bad, diff - tol, 0)), diff.shape)
    return f"{what}: got {got[i]!r}, expected {expected[i]!r} (tolerance {np.broadcast_to(tol, diff.shape)[i]:.3g})"


def state_parts(state):
    """MXNet 1.x state: None, mom, or (mom or None, fp32 master) under multi_precision."""
    if state is None:
        return {}
    if isinstance(state, tuple):
        mom, master = state
        return {"master": master, **({} if mom is None else {"mom": mom})}
    return {"mom": state}


def replay(case, monkeypatch, *, driver=None, expected=None, device="cpu"):
    """Differences between ``run`` and the recorded outputs (``expected``: another record to compare with)."""
    expected = expected or case["out"]
    inp = INPUTS[case["inputs"]]
    dtypes = inp["dtypes"]
    float16_squares = "float16" in dtypes and not case.get("all_rows_sparse") and "sparse" not in case
    rel = FLOAT16_SQUARES_REL if float16_squares else REL
    if "float16" in dtypes and not case["kw"].get("multi_precision"):
        rel = FLOAT16_WITHOUT_MASTER_REL
    errors = []
    for t, (weights, states, opt) in enumerate(run(case, monkeypatch, driver=driver, device=device)):
        for p, dtype in enumerate(dtypes):
            errors.append(difference(f"step {t + 1} weight {p}", weights[p], expected["weights"][t][p], dtype,
                                     inp["w"][p], rel))
            got, want = state_parts(states[p]), expected["states"][t][p] or {}
            if set(got) != set(want):
                errors.append(f"step {t + 1} state {p}: parts {sorted(got)} != {sorted(want)}")
                continue
            for part, values in want.items():
                errors.append(difference(f"step {t + 1} {part} {p}", got[part], values,
                                         "float32" if part == "master" else dtype,
                                         inp["w"][p] if part == "master" else None, rel))
        if opt.num_update != expected["num_update"][t]:
            errors.append(f"step {t + 1}: num_update {opt.num_update} != {expected['num_update'][t]}")
        for attribute in ("last_lr", "cur_lr"):
            if not math.isclose(getattr(opt, attribute), expected[attribute][t], rel_tol=1e-12, abs_tol=1e-300):
                errors.append(f"step {t + 1}: {attribute} {getattr(opt, attribute)} != {expected[attribute][t]}")
    return [e for e in errors if e]


# ---------------------------------------------------------------------------- golden_mxnet_1.9.1.json

# The file's cases on the extra file's inputs and records of the other drivers.
GOLDEN_DRIVERS = ["all", "per_index", "agg1", "agg4"]


@pytest.mark.parametrize("driver", GOLDEN_DRIVERS + ["chunks_2x1", "agg2"])
@pytest.mark.parametrize("name", list(GOLDEN["cases"]))
def test_golden_file_on_every_way_of_calling(name, driver, monkeypatch):
    """The shared golden file's numbers (one call with both indices) on every driver. Where the lr changes
    between steps (V1_F), a call per index sees the momentum correction only in its first call of a step, so
    those drivers are compared with MXNet's own record of them, which differs from the file's."""
    golden = GOLDEN["cases"][name]
    case = copy.deepcopy(EXTRA["cases"][f"golden/{name}@all"])
    same_float32 = [np.array_equal(np.float32(a), np.float32(b)) for a, b in zip(
        INPUTS["golden"]["w"] + sum(INPUTS["golden"]["g"], []), GOLDEN["W0"] + sum(GOLDEN["GS"], []))]
    assert case["inputs"] == "golden" and len(same_float32) == 8 and all(same_float32)
    assert case["kw"] == golden["kw"]
    kind = {"chunks_2x1": "chunks", "per_index": "per_index", "all": "all"}.get(driver, "updater")
    case["chunks"] = [[0], [1]]
    if driver.startswith("agg"):
        case["aggregation"] = driver[3:]
    per_call_lr_change = "sched" in golden and driver in ("per_index", "agg1", "chunks_2x1")
    record = "per_index" if driver == "chunks_2x1" else ("agg4" if driver == "agg2" else driver)
    expected = EXTRA["cases"][f"golden/{name}@{record}"]["out"]
    file_numbers = golden["out"]["v1_default_agg4"]
    weights_seen = []
    errors = replay(case, monkeypatch, driver=kind, expected=expected)
    for t, (weights, _, _) in enumerate(run(case, monkeypatch, driver=kind)):
        weights_seen.append([as_float64(w).copy() for w in weights])
        if not per_call_lr_change:
            errors += [difference(f"step {t + 1} weight {p} vs golden file", weights[p], file_numbers[t][p],
                                  "float32", GOLDEN["W0"][p]) for p in range(2)]
    assert not [e for e in errors if e], errors
    if per_call_lr_change:
        assert any(not np.allclose(weights_seen[t][p], file_numbers[t][p], rtol=0, atol=1e-6)
                   for t in range(3) for p in range(2))


# ---------------------------------------------------------------------------- golden_mxnet_1.9.1_extra.json


@pytest.mark.parametrize("name", list(EXTRA["cases"]))
def test_extra_golden(name, monkeypatch):
    errors = replay(EXTRA["cases"][name], monkeypatch)
    assert not errors, "\n".join(errors[:10])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(EXTRA["cases"]))
def test_extra_golden_on_cuda(name, monkeypatch):
    errors = replay(EXTRA["cases"][name], monkeypatch, device="cuda")
    assert not errors, "\n".join(errors[:10])


def test_extra_goldens_cover_every_driver_and_topic():
    cases = EXTRA["cases"]
    assert EXTRA["mxnet_version"] == "1.9.1"
    assert {c["driver"] for c in cases.values()} == {"all", "per_index", "chunks", "updater"}
    assert {c.get("aggregation", "4") for c in cases.values() if c["driver"] == "updater"} == {"1", "2", "4"}
    assert {name.split("/")[0] for name in cases} == {
        "golden", "correction", "defaults", "wd_mult", "clip", "hparams", "mp16", "fp16", "mp16_f32_norms",
        "fp16_f32_norms", "mixed", "sparse"}
    assert any(c["kw"].get("multi_precision") and "sparse" in c for c in cases.values())


# ---------------------------------------------------------------------------- the momentum correction


def _spec_example(aggregation, monkeypatch):
    monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, aggregation)
    opt = v1.LARS(momentum=0.9, lr_scheduler=v1.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=1.0),
                  param_idx2name={0: "a_bias", 1: "b_bias", 2: "c_bias"})
    updater = v1.get_updater(opt)
    weights = [torch.zeros(1) for _ in range(3)]
    for _ in range(2):
        updater([0, 1, 2], [torch.ones(1)] * 3, weights)
    return [float(updater.states[i]) for i in range(3)], opt


def test_momentum_correction_is_tracked_per_update_call(monkeypatch):
    """The spec's example (FactorScheduler(step=1, factor=0.5), constant grads, no trust ratio): at step 2 the
    lr halves; with one call per weight only the first call sees cur_lr / last_lr = 0.5."""
    per_weight, opt = _spec_example("1", monkeypatch)
    assert per_weight == pytest.approx([-0.95, -1.4, -1.4], abs=1e-7)
    assert (opt.last_lr, opt.cur_lr) == (0.5, 0.5)
    one_call, opt = _spec_example("4", monkeypatch)
    assert one_call == pytest.approx([-0.95] * 3, abs=1e-7)
    assert (opt.last_lr, opt.cur_lr) == (1.0, 0.5)


def test_corrected_momentum_follows_the_last_two_calls():
    opt = v1.LARS(momentum=0.9, learning_rate=0.2)
    assert opt.corrected_momentum() == 0.9 and opt.last_lr is None
    w, g, s = torch.ones(3), torch.ones(3), opt.create_state(0, torch.ones(3))
    opt.update(0, w, g, s)
    assert (opt.last_lr, opt.cur_lr) == (0.2, 0.2) and opt.corrected_momentum() == pytest.approx(0.9)
    opt.set_learning_rate(0.4)
    opt.update(0, w, g, s)
    assert opt.corrected_momentum() == pytest.approx(1.8)  # above 1 while the lr rises: computed as is
    opt.set_learning_rate(0.0)
    opt.update(0, w, g, s)
    assert opt.corrected_momentum() == 0.0 and torch.equal(s, torch.zeros(3))  # MXNet's kernel writes 0 * mom
    opt.set_learning_rate(0.3)
    opt.update(0, w, g, s)
    assert opt.last_lr == 0.0 and opt.corrected_momentum() == 0.9  # off after an lr of 0
    assert v1.LARS(momentum=0.9, momentum_correction=False).corrected_momentum() == 0.9


def test_updater_states_round_trip_keeps_the_correction(monkeypatch):
    case = EXTRA["cases"]["correction/factor@agg2"]
    monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, "2")
    sched = v1.lr_scheduler.FactorScheduler(**case["sched"]["args"])
    opt = v1.LARS(**case["kw"], lr_scheduler=sched)
    updater = v1.get_updater(opt)
    inp = INPUTS["five"]
    weights = [torch.tensor(w) for w in inp["w"]]
    for t in range(2):
        updater(list(range(5)), [torch.tensor(g) for g in inp["g"][t]], weights)
    resumed = v1.get_updater(v1.LARS(momentum=0.9))
    resumed.set_states(updater.get_states(dump_optimizer=True))
    assert (resumed.optimizer.last_lr, resumed.optimizer.cur_lr) == (opt.last_lr, opt.cur_lr)
    copies = [w.clone() for w in weights]
    for t in range(2, 5):
        grads = [torch.tensor(g) for g in inp["g"][t]]
        updater(list(range(5)), grads, weights)
        resumed(list(range(5)), grads, copies)
    assert all(torch.equal(a, b) for a, b in zip(weights, copies))
    assert not difference("weight 0", weights[0], case["out"]["weights"][4][0], "float32", inp["w"][0])


# ---------------------------------------------------------------------------- constructor and defaults


def test_signature_and_defaults():
    opt = v1.LARS()
    assert (opt.momentum, opt.lazy_update, opt.eta, opt.eps, opt.momentum_correction) == (0.0, True, 0.001, 0, True)
    assert opt.lr == 0.01 and opt.learning_rate == 0.01  # learning_rate=None without a scheduler
    assert opt.aggregate_num == 4 and opt.clip_gradient is None and opt.rescale_grad == 1.0
    positional = v1.LARS(0.9, False, 0.01, 1e-9, False)
    assert (positional.momentum, positional.lazy_update, positional.eta, positional.eps,
            positional.momentum_correction) == (0.9, False, 0.01, 1e-9, False)


def test_learning_rate_none_keeps_the_schedulers_base_lr_and_a_value_overwrites_it():
    sched = v1.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.7)
    assert v1.LARS(lr_scheduler=sched).learning_rate == 0.7
    with pytest.warns(UserWarning, match="overwritten"):
        assert v1.LARS(learning_rate=0.2, lr_scheduler=sched).learning_rate == 0.2


def test_aggregation_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, "2")
    opt = v1.LARS()
    monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, "7")
    assert opt.aggregate_num == 2 and v1.LARS().aggregate_num == 7  # read at construction
    for bad in ("0", "-1", "four", "2.5"):
        monkeypatch.setenv(v1.AGGREGATION_SIZE_VARIABLE, bad)
        with pytest.raises(ValueError, match=rf"MXNET_OPTIMIZER_AGGREGATION_SIZE='{bad}'.*int >= 1"):
            v1.LARS()


@pytest.mark.parametrize("keyword,hint", [
    ("aggregate_num", "MXNET_OPTIMIZER_AGGREGATION_SIZE environment variable"),
    ("use_fused_step", "one update path"),
    ("epsilon", "calls it `eps`"),
    ("lars_eta", "the argument is `eta`"),
    ("unknown", None),
])
def test_two_o_keywords_are_type_errors_naming_them(keyword, hint):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'" + (f".*{hint}" if hint else "")):
        v1.LARS(**{keyword: 1})
    with pytest.raises(TypeError, match=keyword):
        v1.Optimizer(**{keyword: 1})


@pytest.mark.parametrize("keyword", ["eps", "momentum_correction", "lars_eta", "lars_epsilon"])
def test_the_two_o_front_end_points_one_x_keywords_to_v1(keyword):
    with pytest.raises(TypeError, match=rf"'{keyword}'.*larsopt\.mxnet\.v1\.LARS"):
        lmx.LARS(**{keyword: 0})


@pytest.mark.parametrize("keyword,value,error", [
    ("momentum", "0.9", TypeError), ("eta", float("nan"), ValueError), ("eps", None, TypeError),
    ("lazy_update", 1, TypeError), ("momentum_correction", "yes", TypeError), ("wd", float("inf"), ValueError),
    ("param_idx2name", {0: 5}, TypeError), ("param_idx2name", [(0, "a")], lmx.MXNetAssertionError),
])
def test_bad_hyper_parameters_name_the_argument(keyword, value, error):
    with pytest.raises(error, match=keyword if keyword != "param_idx2name" or error is TypeError else "dict"):
        v1.LARS(**{keyword: value})


def test_registry_is_one_x_s_own():
    assert type(v1.create("lars", momentum=0.9)) is v1.LARS and type(v1.create("LARS")) is v1.LARS
    assert type(lmx.create("lars")) is lmx.LARS  # MXNet 2.0's registry is unchanged
    assert v1.Optimizer.opt_registry is not lmx.Optimizer.opt_registry
    with pytest.raises(ValueError, match="Cannot find optimizer sgd"):
        v1.create("sgd")
    from larsopt.mxnet import v1 as submodule  # noqa: PLC0415
    assert submodule is lmx.v1 and v1.get_updater(v1.LARS()).optimizer.aggregate_num == 4


# ---------------------------------------------------------------------------- weight decay, clip, states


def test_wd_mult_zero_for_every_name_not_ending_in_weight():
    names = {0: "conv0_weight", 1: "bn0_gamma", 2: "bn0_beta", 3: "fc_bias", 4: "conv_w", 5: "x_weight_"}
    opt = v1.LARS(wd=0.1, param_idx2name=names)
    assert opt.wd_mult == {"bn0_gamma": 0.0, "bn0_beta": 0.0, "fc_bias": 0.0, "conv_w": 0.0, "x_weight_": 0.0}
    assert opt._get_wds(list(range(7))) == [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]  # 6: no name, keeps wd
    opt.set_wd_mult({"conv_w": 2.0, 0: 0.5})
    assert opt._get_wds([0, 1, 4]) == [pytest.approx(0.05), 0.0, pytest.approx(0.2)]  # the rule is rebuilt, then args
    with_params = v1.LARS(wd=0.1, param_idx2name=names, param_dict={1: _Param(1.0, 1.0)})
    assert with_params._get_wds([1, 2]) == [0.1, 0.0]  # param_dict takes priority over the name rule
    assert v1.Optimizer(wd=0.1, param_idx2name=names)._get_wds([0, 1, 2]) == [0.1, 0.1, 0.0]  # the base exempts _gamma
    assert lmx.LARS(wd=0.1, param_idx2name=names)._get_wds([1, 3]) == [0.1, 0.1]  # MXNet 2.0 has no such rule


@pytest.mark.parametrize("off", [None, 0, 0.0, -0.5])
def test_clip_gradient_zero_none_or_negative_is_off(off):
    def run_with(clip):
        opt = v1.LARS(momentum=0.9, learning_rate=0.5, eta=0.1, wd=0.01, clip_gradient=clip, rescale_grad=3.0)
        w, s = torch.tensor([0.5, -1.0, 2.0]), torch.zeros(3)
        for g in ([1.0, -2.0, 0.5], [0.3, 0.1, -4.0]):
            opt.update([0], [w], [torch.tensor(g)], [s])
        return w
    assert torch.equal(run_with(off), run_with(None))
    assert not torch.equal(run_with(0.1), run_with(None))


def test_multi_precision_state_is_momentum_then_master():
    w16 = torch.tensor([0.5, -0.25], dtype=torch.float16)
    mom, master = v1.LARS(momentum=0.9, multi_precision=True).create_state_multi_precision(0, w16)
    assert mom.dtype == master.dtype == torch.float32 and torch.equal(mom, torch.zeros(2))
    assert torch.equal(master, w16.float())
    assert v1.LARS(multi_precision=True).create_state_multi_precision(0, w16)[0] is None
    fp32 = v1.LARS(momentum=0.9, multi_precision=True).create_state_multi_precision(0, torch.ones(2))
    assert isinstance(fp32, torch.Tensor) and fp32.dtype == torch.float32
    with pytest.warns(UserWarning, match="float16"):
        assert v1.LARS(momentum=0.9).create_state_multi_precision(0, w16).dtype == torch.float16
    opt = v1.LARS(momentum=0.9, multi_precision=True)
    with pytest.raises(ValueError, match=r"\(momentum, master\) pair"):
        opt.update(0, w16, w16, torch.zeros(2))
    assert opt.num_update == 0


def test_lazy_update_changes_only_the_rows_present():
    weight, mom = torch.arange(12.0).reshape(4, 3) / 10 + 0.1, torch.full((4, 3), 0.5)
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 3), size=(4, 3))
    lazy_w, lazy_mom = weight.clone(), mom.clone()
    v1.LARS(momentum=0.9, wd=0.1, learning_rate=0.5).update(0, lazy_w, grad, lazy_mom)
    assert torch.equal(lazy_w[[0, 2]], weight[[0, 2]]) and torch.equal(lazy_mom[[0, 2]], mom[[0, 2]])
    assert not torch.equal(lazy_w[[1, 3]], weight[[1, 3]])
    dense_w, dense_mom = weight.clone(), mom.clone()
    v1.LARS(momentum=0.9, wd=0.1, learning_rate=0.5, lazy_update=False).update(0, dense_w, grad, dense_mom)
    from_dense_w, from_dense_mom = weight.clone(), mom.clone()
    v1.LARS(momentum=0.9, wd=0.1, learning_rate=0.5).update(0, from_dense_w, grad.to_dense(), from_dense_mom)
    assert torch.equal(dense_w, from_dense_w) and torch.equal(dense_mom, from_dense_mom)
    assert torch.equal(lazy_w[[1, 3]], dense_w[[1, 3]])


def test_numpy_arrays_and_pickled_optimizer():
    opt = v1.LARS(momentum=0.9, learning_rate=0.3, eta=0.1)
    w = np.array([0.5, -1.0, 2.0], np.float32)
    state = opt.create_state(0, w)
    opt.update(0, w, np.array([1.0, 2.0, -0.5], np.float32), state)
    assert isinstance(state, np.ndarray) and not np.allclose(w, [0.5, -1.0, 2.0])
    copied = pickle.loads(pickle.dumps(opt))
    assert (copied.cur_lr, copied.last_lr, copied.num_update) == (0.3, 0.3, 1)
