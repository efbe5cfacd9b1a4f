"""LARS telemetry (``larsopt.telemetry``): each param's norms, trust ratio, step size and flags.

Every value is checked against a float64 recomputation from the same inputs, on every impl; the
step with telemetry on (and an accumulator) never converts a tensor to Python; the state and the
updates are those of telemetry off; the warnings fire on a layer LARS cannot serve and stay
silent on a healthy run; TensorBoard event files and JSON lines read back.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import larsopt
from larsopt import telemetry as T
from host_sync import ConversionCounter

IMPLS = ("reference", "foreach", "fused")
ETA, EPSILON, RESCALE = 0.02, 1e-8, 0.5
# (shape, weight scale, gradient scale): ordinary tensors, a small and a large ratio, a zero weight,
# a zero gradient.
TENSORS = [((5, 4), 1.0, 1.0), ((7,), 1.0, 10.0), ((4, 4), 1.0, 0.01), ((3, 3, 2), 0.0, 1.0), ((6,), 1.0, 0.0)]
UNADAPTED = [(4,), (3, 2)]  # a lars=False group
CONFIGS = [dict(zip(("trust_norm", "fallback_on", "trust_clip", "fallback", "weight_decay"), values))
           for values in itertools.product(("sum", "update"), ("zero_norm", "zero_denominator"), (False, True),
                                           ("ratio_one", "plain_step"), (0.0, 0.01))]


def _params(seed: int = 0, infinite_grad: bool = False):
    """Named (weight, grad) pairs of the adapted tensors and of the lars=False group."""
    generator = torch.Generator().manual_seed(seed)
    adapted = {}
    for number, (shape, w_scale, g_scale) in enumerate(TENSORS):
        adapted[f"t{number}"] = (torch.randn(shape, generator=generator) * w_scale,
                                 torch.randn(shape, generator=generator) * g_scale)
    if infinite_grad:
        adapted["t0"][1][0, 0] = math.inf
    unadapted = {f"u{number}": (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
                 for number, shape in enumerate(UNADAPTED)}
    return adapted, unadapted


def _optimizer(adapted, unadapted, **options):
    groups = [{"params": [(name, torch.nn.Parameter(w.clone())) for name, (w, _) in named.items()], **group_keys}
              for named, group_keys in ((adapted, {}), (unadapted, {"lars": False}))]
    opt = larsopt.LARS(groups, eta=ETA, epsilon=EPSILON, rescale_grad=RESCALE, telemetry=True, **options)
    for group, named in zip(opt.param_groups, (adapted, unadapted)):
        for param, (_, grad) in zip(group["params"], named.values()):
            param.grad = grad.clone()
    return opt


def _expected(weight, grad, *, adapt, lr, weight_decay, trust_norm, fallback_on, trust_clip, fallback,
              maximize=False, grad_scale=None, skipped=False):
    """One param's row of larsopt.telemetry.COLUMNS (but the streaks), in float64 from its inputs."""
    flags = dict(fallback=False, clipped=False, fallback_zero_w=False, fallback_zero_g=False,
                 fallback_not_finite=False, skipped=skipped)
    if not adapt:
        return dict(w_norm=math.nan, g_norm=math.nan, trust_ratio=1.0, step_size=lr, **flags)
    w, g = weight.double(), grad.double()
    g = -g if maximize else g
    g = g / grad_scale if grad_scale is not None else g
    g = g * RESCALE
    w_norm, g_norm, u_norm = w.norm().item(), g.norm().item(), (g + weight_decay * w).norm().item()
    finite = math.isfinite(w_norm) and math.isfinite(g_norm)
    denominator = g_norm + weight_decay * w_norm if trust_norm == "sum" else u_norm
    update_ok = trust_norm == "sum" or (math.isfinite(u_norm) and u_norm > 0)
    if fallback_on == "zero_norm":
        taken = finite and w_norm > 0 and g_norm > 0 and update_ok
    else:
        taken = finite and w_norm > 0 and denominator > 0 and update_ok
    ratio = ETA * w_norm / (denominator + EPSILON) if taken else 1.0
    lam = ratio
    if trust_clip and (taken or fallback == "ratio_one"):
        lam = ratio / lr if ratio < lr else 1.0
    flags.update(fallback=not taken, clipped=trust_clip and taken and ratio >= lr,
                 fallback_zero_w=finite and w_norm == 0, fallback_zero_g=not taken and finite and w_norm > 0,
                 fallback_not_finite=not finite)
    return dict(w_norm=w_norm, g_norm=g_norm, trust_ratio=lam, step_size=lr * lam, **flags)


def _assert_row(actual, expected, name):
    for column, value in expected.items():
        if isinstance(value, bool):
            assert actual[column] is value, (name, column, actual)
        elif math.isnan(value):
            assert math.isnan(actual[column]), (name, column, actual)
        else:
            assert actual[column] == pytest.approx(value, rel=2e-6), (name, column, actual)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_values_equal_a_float64_recomputation(impl, config, single_thread):
    adapted, unadapted = _params()
    lr = 0.05
    opt = _optimizer(adapted, unadapted, lr=lr, momentum=0.9, impl=impl, **config)
    opt.step()
    values = opt.telemetry().to_dict()
    assert list(values) == [*adapted, *unadapted]
    for name, (weight, grad) in {**adapted, **unadapted}.items():
        _assert_row(values[name], _expected(weight, grad, adapt=name in adapted, lr=lr, **config), name)
    assert any(row["clipped"] for row in values.values()) == config["trust_clip"]
    assert values["t3"]["fallback_zero_w"] and values["t3"]["fallback_streak"] == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_amp_values_and_the_skip_flag(impl, found_inf, single_thread):
    """Under GradScaler the norms are of the unscaled gradient; a skipped step says so, and an
    infinite gradient is a fallback for a norm not finite."""
    adapted, unadapted = _params(seed=1, infinite_grad=found_inf > 0)
    config = dict(trust_norm="sum", fallback_on="zero_norm", trust_clip=False, fallback="ratio_one",
                  weight_decay=1e-3)
    lr = torch.tensor(0.3)
    opt = _optimizer(adapted, unadapted, lr=lr, impl=impl, maximize=True, **config)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(found_inf)
    opt.step()
    lr.fill_(7.0)  # a schedule changing lr in place after the step: the telemetry keeps the step's lr
    values = opt.telemetry().to_dict()
    for name, (weight, grad) in {**adapted, **unadapted}.items():
        expected = _expected(weight, grad, adapt=name in adapted, lr=torch.tensor(0.3).item(), maximize=True,
                             grad_scale=4.0, skipped=found_inf > 0, **config)
        if impl == "fused" and found_inf:  # the kernel returns before computing anything: nan rows
            expected = dict(w_norm=math.nan, g_norm=math.nan, trust_ratio=math.nan, step_size=math.nan,
                            skipped=True, fallback=name in adapted, fallback_not_finite=name in adapted)
        _assert_row(values[name], expected, name)
    assert values["t0"]["fallback_not_finite"] is (found_inf > 0)
    # a skipped step does not count towards a streak
    assert values["t3"]["fallback_streak"] == (0 if found_inf else 1)


def test_streaks_count_steps_in_a_row_and_skip_amp_skipped_steps(single_thread):
    stuck = torch.nn.Parameter(torch.zeros(3))  # zero weight, zero gradient: always the fallback
    moving = torch.nn.Parameter(torch.ones(4))
    capped = torch.nn.Parameter(torch.ones(5))
    opt = larsopt.LARS([{"params": [stuck, moving]}, {"params": [capped], "trust_clip": True, "lr": 1e-6}], lr=0.1,
                       telemetry=True)
    expected = []
    for step in range(6):
        stuck.grad = torch.zeros(3)
        moving.grad = torch.zeros(4) if step < 3 else torch.ones(4)  # |g| = 0 for 3 steps, then not
        capped.grad = torch.ones(5)
        if step == 2:
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
        opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
        values = opt.telemetry().to_dict()
        expected.append([values[name][column] for name in ("group0.0", "group0.1", "group1.0")
                         for column in ("fallback_streak", "clip_streak")])
    assert expected == [[1, 0, 1, 0, 0, 1], [2, 0, 2, 0, 0, 2], [2, 0, 2, 0, 0, 2],
                        [3, 0, 0, 0, 0, 3], [4, 0, 0, 0, 0, 4], [5, 0, 0, 0, 0, 5]]


def test_accumulator_folds_every_step_and_resets_on_read(single_thread):
    adapted, unadapted = _params(seed=2)
    lr = torch.tensor(0.05)
    opt = _optimizer(adapted, unadapted, lr=lr, momentum=0.9, trust_clip=True, weight_decay=1e-3)
    accumulator = T.Accumulator(opt)
    assert accumulator.read().to_dict() == {}  # nothing stepped yet
    folded: dict[str, list[dict]] = {name: [] for name in [*adapted, *unadapted]}
    skipped = {name: 0 for name in folded}
    generator = torch.Generator().manual_seed(3)
    for step in range(7):
        lr.fill_((0.05, 0.02, 0.08)[step % 3])
        for group in opt.param_groups:
            for param in group["params"]:
                param.grad = torch.randn(param.shape, generator=generator) * 0.1
        if step in (2, 5):  # some params without a gradient
            opt.param_groups[0]["params"][1].grad = None
            opt.param_groups[1]["params"][0].grad = None
        if step == 4:
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
        for name, row in opt.telemetry().to_dict().items():
            if row["skipped"]:
                skipped[name] += 1
            else:
                folded[name].append(row)
    values = accumulator.read().to_dict()
    assert list(values) == list(folded)
    for name, rows in folded.items():
        row = values[name]
        assert (row["steps"], row["skipped"]) == (len(rows), skipped[name])
        for column in ("trust_ratio", "step_size"):
            series = [r[column] for r in rows]
            assert row[f"{column}_mean"] == pytest.approx(sum(series) / len(series), rel=1e-6)
            assert row[f"{column}_min"] == pytest.approx(min(series), rel=1e-7)
            assert row[f"{column}_max"] == pytest.approx(max(series), rel=1e-7)
        for column in ("fallback", "clipped", "fallback_zero_w", "fallback_zero_g", "fallback_not_finite"):
            assert row[column] == sum(r[column] for r in rows), (name, column)
    assert values["t3"]["fallback_zero_w"] == 1 and values["t3"]["steps"] == 7 - 1  # (zero until its first step)
    assert any(row["clipped"] for row in values.values()) and any(row["clip_streak"] for row in values.values())
    after = accumulator.read().to_dict()
    assert all(row["steps"] == 0 and math.isnan(row["trust_ratio_mean"]) and row["fallback"] == 0
               for row in after.values())
    assert all(after[name]["clip_streak"] == row["clip_streak"] for name, row in values.items())  # (not the window's)


def test_an_accumulator_outlives_its_optimizer(single_thread):
    """An accumulator read after its optimizer was collected gives what it folded in, with each
    group's trust-ratio flag as its last step left it."""
    adapted, unadapted = _params(seed=4)
    opt = _optimizer(adapted, unadapted, lr=0.1, weight_decay=1e-3)
    accumulator = T.Accumulator(opt)
    opt.step()
    opt.step()
    expected = accumulator.read()
    opt.step()
    del opt
    gc.collect()
    values = accumulator.read()
    assert values.adapted == expected.adapted == [True] * len(adapted) + [False] * len(unadapted)
    assert {name: row["steps"] for name, row in values.to_dict().items()} == {name: 1 for name in [*adapted, *unadapted]}


def test_a_new_param_group_restarts_the_slots(single_thread):
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = larsopt.LARS([first], lr=0.1, telemetry=True)
    accumulator = T.Accumulator(opt)
    first.grad = torch.ones(3)
    opt.step()
    opt.add_param_group({"params": [second]})
    second.grad = torch.ones(2)
    opt.step()
    assert list(opt.telemetry()) == ["group0.0", "group1.0"]
    assert {name: row["steps"] for name, row in accumulator.read().to_dict().items()} == \
        {"group0.0": 1, "group1.0": 1}


@pytest.mark.parametrize("impl", ("auto",) + IMPLS)
def test_step_with_telemetry_has_no_host_sync(impl):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
    lr = torch.tensor(0.1)
    opt = larsopt.LARS(larsopt.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-4, trust_clip=True,
                       impl=impl, telemetry=True)
    accumulator = T.Accumulator(opt)
    for step in range(3):
        model(torch.randn(4, 8)).square().sum().backward()
        if step == 1:
            model[2].bias.grad = None  # a step with a param missing: the slots are scattered
        lr.fill_(0.1 / (step + 1))
        if step >= 1:
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            with ConversionCounter() as counter:
                opt.step()
                last, window = opt.telemetry(), accumulator.read()
            assert counter.count == 0
            assert len(last) == len(window) - (step == 1)
        else:
            opt.step()
        opt.zero_grad()


def test_telemetry_changes_neither_the_step_nor_the_state(single_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    options = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, trust_clip=True)
    with_telemetry = larsopt.LARS(larsopt.param_groups(model), telemetry=True, **options)
    without = larsopt.LARS(larsopt.param_groups(twin), **options)
    accumulator = T.Accumulator(with_telemetry)
    for _ in range(3):
        x = torch.randn(4, 6)
        for net, opt in ((model, with_telemetry), (twin, without)):
            net(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        with_telemetry.telemetry().to_dict()
        accumulator.read()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    on, off = with_telemetry.state_dict(), without.state_dict()
    assert on["state"].keys() == off["state"].keys()
    for key, state in on["state"].items():
        assert state.keys() == off["state"][key].keys()
        assert all(torch.equal(value, off["state"][key][name]) for name, value in state.items())
    assert [{k: v for k, v in g.items() if k != "telemetry"} for g in on["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "telemetry"} for g in off["param_groups"]]
    assert all(g["telemetry"] for g in on["param_groups"])
    copied = copy.deepcopy(with_telemetry)  # the telemetry is not copied along
    assert not hasattr(copied, "_telemetry_recorder")
    without.load_state_dict(on)


def _stuck_model():
    """A LayerNorm whose scale and shift are initialised to 0 before a zero-initialised Linear: none
    of the three, nor the first Linear, ever gets a gradient; only the last bias moves."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    for param in (model[1].weight, model[1].bias, model[2].weight):
        torch.nn.init.zeros_(param)
    return model


def _train(model, opt, steps, read_every=10, accumulator=None):
    inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        if step % read_every == read_every - 1:
            opt.telemetry().to_dict()
            if accumulator is not None:
                accumulator.read().to_dict()
    return losses


def test_fallback_warning_fires_once_on_a_zero_initialised_layer(single_thread):
    model = _stuck_model()
    opt = larsopt.LARS(model.named_parameters(), lr=10.0, momentum=0.9, telemetry=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, T.FALLBACK_WARNING_STEPS - 1)
        assert not caught  # (sync-free in the step: only a read-back evaluates them)
        _train(model, opt, T.FALLBACK_WARNING_STEPS + 20)
    messages = {str(w.message).split("'")[1]: str(w.message) for w in caught if w.category is T.TelemetryWarning}
    assert len(messages) == len([w for w in caught if w.category is T.TelemetryWarning])  # once each
    assert sorted(messages) == ["0.bias", "0.weight", "1.bias", "1.weight", "2.weight"]
    assert "|w| = 0" in messages["1.weight"] and "|g| = 0" in messages["0.weight"]
    assert "step size lr * lam = 10" in messages["1.weight"]


def test_fallback_warning_from_an_accumulator_and_turned_off(single_thread):
    model = _stuck_model()
    opt = larsopt.LARS(model.named_parameters(), lr=10.0, telemetry=True)
    accumulator = T.Accumulator(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=T.TelemetryWarning)
        _train(model, opt, T.FALLBACK_WARNING_STEPS + 10)
    assert not caught
    model = _stuck_model()
    opt = larsopt.LARS(model.named_parameters(), lr=10.0, telemetry=True)
    accumulator = T.Accumulator(opt)
    _train(model, opt, T.FALLBACK_WARNING_STEPS, read_every=1000)
    with pytest.warns(T.TelemetryWarning, match="'1.weight' took the trust-ratio fallback"):
        accumulator.read().to_dict()


def test_clip_warning_fires_once_for_a_param_clipped_at_every_step(single_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    groups = larsopt.param_groups(model, exclude="norm_and_bias")
    groups[0]["lr"] = 1e-5  # weights: a ratio far above lr, capped at every step
    opt = larsopt.LARS(groups, lr=0.1, eta=0.001, trust_clip=True, telemetry=True)
    with pytest.warns(T.TelemetryWarning) as caught:
        _train(model, opt, T.CLIP_WARNING_STEPS + 30)
    messages = sorted(str(w.message) for w in caught if w.category is T.TelemetryWarning)
    assert len(messages) == 2 and all("capped by the LARC clip" in m for m in messages)
    assert "'0.weight'" in messages[0] and "'2.weight'" in messages[1]


def test_warnings_stay_silent_on_a_healthy_run(single_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    opt = larsopt.LARS(larsopt.param_groups(model, exclude="norm_and_bias"), lr=1.0, momentum=0.9, eta=0.02,
                       weight_decay=5e-4, trust_clip=True, telemetry=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, 3 * T.FALLBACK_WARNING_STEPS, accumulator=T.Accumulator(opt))
    assert [str(w.message) for w in caught] == []
    assert losses[-1] < 0.1 * losses[0]


def _trained(steps: int = 2):
    model = _stuck_model()
    opt = larsopt.LARS(larsopt.param_groups(model, exclude="norm_and_bias"), lr=0.5, telemetry=True)
    _train(model, opt, steps, read_every=1000)
    return model, opt


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, opt = _trained()
    accumulator = T.Accumulator(opt)
    writer = SummaryWriter(str(tmp_path))
    steps = {}
    for step in (1, 2):  # (the same last step twice)
        T.to_tensorboard(writer, opt, step)
        steps[step] = opt.telemetry().to_dict()
    _train(model, opt, 1)
    window = accumulator.read()
    T.to_tensorboard(writer, window, 3)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"lars_{column}/2.weight" for column in T.COLUMNS} <= scalars
    assert {f"lars_{column}/2.weight" for column in T.ACCUMULATED_COLUMNS} <= scalars
    ratio = [event.value for event in events.Scalars("lars_trust_ratio/0.weight")]
    assert ratio == pytest.approx([steps[1]["0.weight"]["trust_ratio"]] * 2, rel=1e-7)
    assert [event.step for event in events.Scalars("lars_steps/0.weight")] == [3]
    histograms = events.Histograms("lars_trust_ratio")
    assert [h.step for h in histograms] == [1, 2, 3]
    assert histograms[0].histogram_value.num == 2  # the two adapted params (the weights)


def test_tensorboard_is_imported_only_when_asked():
    code = ("import sys, torch, larsopt, larsopt.telemetry; larsopt.LARS([torch.zeros(2)], telemetry=True); "
            "print(sorted(m for m in sys.modules if 'tensorboard' in m))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_jsonl_lines_are_strict_json(tmp_path):
    model, opt = _trained()
    accumulator = T.Accumulator(opt)
    _train(model, opt, 1, read_every=1000)
    path = tmp_path / "lars.jsonl"
    T.to_jsonl(path, opt, 7)
    with open(path, "a", encoding="utf-8") as handle:
        T.to_jsonl(handle, accumulator, 8)

    def no_constant(name):
        raise AssertionError(f"{name} in a JSON line")

    lines = [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [7, 8]
    expected = opt.telemetry().to_dict()
    assert lines[0]["params"]["0.weight"] == expected["0.weight"]
    assert lines[0]["params"]["1.weight"]["w_norm"] is None  # lars=False: no norm
    assert lines[0]["params"]["1.weight"]["fallback"] is False
    assert lines[1]["params"]["0.weight"]["steps"] == 1
