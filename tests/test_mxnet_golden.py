"""larsopt.mxnet.LARS reproduces the real MXNet 2.0 golden numbers: cases A-H on every path.

fp32: within 1e-5 of the update size; fp16 with multi_precision: within one fp16 ulp.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_mxnet_2.0.0b1.json").read_text())
PATHS = {
    "step": {"use_fused_step": False},
    "fused_agg1": {"use_fused_step": True, "aggregate_num": 1},
    "fused_agg4": {"use_fused_step": True, "aggregate_num": 4},
}
SETUPS = {"set_lr_mult({0:2.0}); set_wd_mult({1:0.0})": lambda opt: (opt.set_lr_mult({0: 2.0}),
                                                                     opt.set_wd_mult({1: 0.0}))}
CASE_PATHS = [(case, path) for case in GOLDEN["cases"] for path in PATHS]


def make_optimizer(case: dict, path: str) -> lmx.LARS:
    kwargs = dict(case["kw"], **PATHS[path])
    if "names" in case:
        kwargs["param_idx2name"] = dict(enumerate(case["names"]))
    if "sched" in case:
        kwargs["lr_scheduler"] = lmx.lr_scheduler.FactorScheduler(**case["sched"])
    opt = lmx.LARS(**kwargs)
    if "note" in case:
        SETUPS[case["note"]](opt)
    return opt


def as_float64(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


def assert_matches(case_name: str, step: int, dtype: str, before, after, expected) -> None:
    for b, a, e in zip(before, after, expected):
        b, a, e = (np.asarray(x, dtype=np.float64) for x in (b, a, e))
        if dtype == "float16":
            ulp = np.spacing(np.abs(e).astype(np.float16)).astype(np.float64)
            assert np.all(np.abs(a - e) <= ulp), (case_name, step, a, e)
        else:
            scale = max(np.abs(e - b).max(), 1e-30)
            assert np.abs(a - e).max() / scale <= 1e-5, (case_name, step, a, e)


def run_case(case_name: str, path: str, *, kind: str, device: str = "cpu") -> None:
    """Replay one golden case; ``kind`` is "direct" (update_multi_precision with both
    indices, as the generator does), "updater" (through lmx.get_updater) or "numpy"."""
    case = GOLDEN["cases"][case_name]
    dtype = case.get("dtype", "float32")
    opt = make_optimizer(case, path)
    if kind == "numpy":
        weights = [np.array(w, dtype=dtype) for w in case.get("weights", GOLDEN["W0"])]
    else:
        weights = [torch.tensor(w, dtype=getattr(torch, dtype), device=device)
                   for w in case.get("weights", GOLDEN["W0"])]
    updater = lmx.get_updater(opt)
    states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(weights)]
    for step, (step_grads, expected) in enumerate(zip(case.get("grads", GOLDEN["GS"]), case["out"][path])):
        before = [as_float64(w) for w in weights]
        if kind == "numpy":
            grads = [np.array(g, dtype=dtype) for g in step_grads]
        else:
            grads = [torch.tensor(g, dtype=getattr(torch, dtype), device=device) for g in step_grads]
        if kind == "updater":
            updater([0, 1], grads, weights)
        else:
            opt.update_multi_precision([0, 1], weights, grads, states)
        assert_matches(case_name, step, dtype, before, [as_float64(w) for w in weights], expected)


@pytest.mark.parametrize("case_name,path", CASE_PATHS)
def test_golden_direct(case_name: str, path: str) -> None:
    run_case(case_name, path, kind="direct")


@pytest.mark.parametrize("case_name,path", CASE_PATHS)
def test_golden_through_updater(case_name: str, path: str) -> None:
    run_case(case_name, path, kind="updater")


@pytest.mark.parametrize("case_name", list(GOLDEN["cases"]))
def test_golden_numpy_arrays(case_name: str) -> None:
    run_case(case_name, "fused_agg1", kind="numpy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_name,path", CASE_PATHS)
def test_golden_on_cuda(case_name: str, path: str) -> None:
    run_case(case_name, path, kind="updater", device="cuda")


def test_every_case_and_path_is_covered() -> None:
    assert {name[0] for name in GOLDEN["cases"]} == set("ABCDEFGH")
    assert all(set(case["out"]) == set(PATHS) for case in GOLDEN["cases"].values())
