"""The options spine: one declaration per option, paths that hand on what they do not implement,
named kernel arguments, the norms seam (two phases) and the per-tensor stats output."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

import larsopt
from larsopt import functional as F
from larsopt import options as O
from larsopt._impl import foreach, fused_cpu, reference
from option_registry import OPTIONS

SHAPES = [(5,), (7, 6), (4, 3, 5), (41_000,), (9,)]  # one above the kernel's per-thread split size
# torch's float32 norm of the 41,000 values and the kernel's blocked sum differ in the 7th digit
TOLERANCE = 3e-6
ZERO_WEIGHT, ZERO_GRAD = 4, 2


def _inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    buffers = [(0.1 * torch.randn(shape, generator=generator)).to(dtype) for shape in SHAPES]
    weights[ZERO_WEIGHT].zero_()  # the fallbacks: a zero weight and a zero gradient
    grads[ZERO_GRAD].zero_()
    return weights, grads, buffers


def _run(impl, option_values, steps=2, dtype=torch.float32, stats=None, inputs="dense"):
    """Two steps of every tensor of :func:`_inputs` (prepared as ``inputs`` says, see
    option_registry.OptionCase), the lr changing between them unless the option is lr itself."""
    weights, grads, buffers = _inputs(dtype)
    masters = [None] * len(weights)
    params = [w.clone() for w in weights]
    if inputs in ("master", "bf16"):
        params = [w.to(torch.bfloat16) for w in weights]
        grads = [g.to(torch.bfloat16) for g in grads]
        if inputs == "master":
            masters = [w.clone() for w in weights]
    if inputs == "sparse":  # rows 1 and 4 (twice) of the 2-D tensor
        dense = grads[1]
        grads[1] = torch.sparse_coo_tensor(torch.tensor([[1, 4, 4]]), dense[[1, 4, 4]], dense.shape)
    momentum = option_values.get("momentum", 0.0)
    bufs = [b.clone() for b in buffers] if momentum != 0 and inputs != "first_step" else [None] * len(params)
    if momentum != 0 and masters[0] is not None:
        bufs = [b.float() for b in bufs]
    extra = dict(previous_lr=0.8) if inputs == "previous_lr" else {}
    for step in range(steps):
        values = {"lr": (0.4, 0.25)[step % 2], "eta": 0.5, **option_values}
        F.lars(params, grads, bufs, impl=impl, stats=stats, master_params=masters, generator=torch.Generator().manual_seed(0),
               **extra, **values)
    results = [m if m is not None else p for m, p in zip(masters, params)]
    return [r.double() for r in results], [b if b is None else b.double() for b in bufs]


def _relative(result, expected, start):
    """|result - expected| relative to the change the step made (as in test_impl)."""
    change = (expected.double() - start.double()).norm()
    difference = (result.double() - expected.double()).norm()
    return (difference / change).item() if change > 0 else difference.item()


def test_every_option_is_in_the_test_registry():
    assert set(OPTIONS) == {field.name for field in dataclasses.fields(O.LarsOptions)}


def test_every_option_has_a_doc_and_its_default_passes_its_check():
    for field in dataclasses.fields(O.LarsOptions):
        option = field.metadata["option"]
        assert option.doc, field.name
        option.check(field.name, field.default)
    O.LarsOptions().check()


@pytest.mark.parametrize("impl", ["foreach", "fused", "auto"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_value_matches_the_reference_on_every_impl(name, impl):
    """Each option at each of its test values: every impl computes it or hands it on, never ignores it."""
    case = OPTIONS[name]
    weights, _, buffers = _inputs()
    tolerance = TOLERANCE if case.inputs not in ("master", "bf16") else 1e-2
    for value in case.values:
        option_values = {**dict(case.base), name: value}
        want = _run("reference", option_values, inputs=case.inputs)
        got = _run(impl, option_values, inputs=case.inputs)
        for a, b, start in zip(got[0] + got[1], want[0] + want[1], weights + buffers):
            if b is not None:
                assert _relative(a, b, start) <= tolerance, f"{impl}: {name}={value!r}"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_walk_value_changes_the_result(name):
    """The walk above proves something: on its inputs, some test value of each option changes what the
    reference computes, by far more than the tolerance."""
    case = OPTIONS[name]
    default = _run("reference", dict(case.base), inputs=case.inputs)
    weights, _, _ = _inputs()
    changes = []
    for value in case.values:
        got = _run("reference", {**dict(case.base), name: value}, inputs=case.inputs)
        changes.append(max(_relative(a, b, start) for a, b, start in zip(got[0], default[0], weights)))
    assert max(changes) > 1e-3, f"{name}: its test values change the result by at most {max(changes):.2g}"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_bad_values_raise_naming_the_option(name):
    """The same check from the optimizer (its param-group key) and from functional.lars (keywords)."""
    key = O._GROUP_KEYS.get(name)
    for bad in OPTIONS[name].bad:
        with pytest.raises(ValueError, match=name):
            F.lars([torch.zeros(3)], [torch.ones(3)], [None], **{"lr": 0.1, name: bad})
        if key is not None:
            with pytest.raises(ValueError, match=key):
                larsopt.LARS([{"params": [torch.zeros(3, requires_grad=True)], key: bad}], momentum=0.5)


def test_unknown_keyword_and_both_forms_are_type_errors():
    with pytest.raises(TypeError, match="damping"):
        F.lars([torch.zeros(3)], [torch.ones(3)], [None], lr=0.1, damping=0.1)
    with pytest.raises(TypeError, match="not both"):
        F.lars([torch.zeros(3)], [torch.ones(3)], [None], O.LarsOptions(), lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        F.lars([torch.zeros(3)], [torch.ones(3)], [None])


def test_an_option_a_path_does_not_declare_is_implemented_only_at_its_default():
    assert O.unsupported(O.LarsOptions(momentum=0.9), {}) == "momentum"
    assert O.unsupported(O.LarsOptions(), {}) is None
    assert O.unsupported(O.LarsOptions(lr=torch.tensor(0.1)), {"lr": O.ANY}) is None
    assert O.unsupported(O.LarsOptions(math_dtype=torch.float16), fused_cpu.SUPPORTED) == "math_dtype"
    assert O.unsupported(O.LarsOptions(math_dtype=torch.float16), foreach.SUPPORTED) == "math_dtype"
    assert O.unsupported(O.LarsOptions(math_dtype=torch.float16), reference.SUPPORTED) is None


def test_a_fast_path_that_does_not_declare_an_option_hands_every_tensor_on(monkeypatch):
    """As if trust_clip were new: the kernel does not declare it, so its tensors go to foreach."""
    calls = []
    monkeypatch.setattr(fused_cpu, "SUPPORTED", {k: v for k, v in fused_cpu.SUPPORTED.items() if k != "trust_clip"})
    for module, name in ((fused_cpu, "step"), (foreach, "lars_step")):
        original = getattr(module, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setitem(F._STEPS, "fused" if module is fused_cpu else "foreach", recording)
    got = _run("fused", {"trust_clip": True, "momentum": 0.9})
    assert calls == ["lars_step", "lars_step"]  # two steps, both on foreach
    want = _run("reference", {"trust_clip": True, "momentum": 0.9})
    for a, b, start in zip(got[0], want[0], _inputs()[0]):
        assert _relative(a, b, start) <= TOLERANCE
    calls.clear()
    _run("fused", {"trust_clip": False, "momentum": 0.9})
    assert calls == ["step", "step"]


def test_kernel_arguments_are_a_named_struct_of_the_kernels_size():
    library = fused_cpu.load()
    if library is None:
        pytest.skip(f"no C++ kernel here: {fused_cpu.unavailable_reason()}")
    assert library.larsopt_kernel_args_size() == ctypes.sizeof(fused_cpu._KernelArgs)
    names = {name for name, _ in fused_cpu._KernelArgs._fields_}
    assert set(fused_cpu._REAL_FIELDS) <= names and set(fused_cpu._SWITCH_FIELDS) <= names
    assert library.larsopt_lars_step.argtypes == [ctypes.POINTER(fused_cpu._KernelArgs)]


@pytest.mark.parametrize("path", ["fused", "foreach", "reference"])
@pytest.mark.parametrize("option_values", [
    dict(momentum=0.9, weight_decay=0.01),
    dict(momentum=0.9, momentum_form="torch", nesterov=True, trust_norm="update", weight_decay=0.01),
    dict(trust_clip=True, clip_gradient=0.5, rescale_grad=2.0, maximize=True),
    dict(adapt=False, momentum=0.9),
], ids=str)
def test_two_phase_step_with_a_reduction_equals_the_one_call_step(path, option_values):
    """The norms seam: sums first, reduce_sums (here the identity, counted), then the update, gives
    the one-call step's numbers bit for bit, with one reduction per call."""
    steps = {"fused": fused_cpu.step, "foreach": foreach.lars_step, "reference": reference.lars_step}
    options = O.LarsOptions(lr=torch.tensor(0.4), eta=0.5, **option_values)
    results = []
    for reduce in (None, "identity"):
        weights, grads, buffers = _inputs()
        if options.momentum == 0:
            buffers = [None] * len(weights)
        stats = torch.zeros(len(weights), 3)
        seen = []

        def identity(sums):
            seen.append(sums.shape)
            return sums.clone()

        rest = steps[path](weights, grads, buffers, [None] * len(weights), options, stats=stats,
                           reduce_sums=identity if reduce else None)
        assert not rest
        results.append((weights, buffers, stats))
        if reduce:
            assert seen == ([(len(weights), 3)] if options.adapt else [])
    (w1, b1, s1), (w2, b2, s2) = results
    for a, b in zip(w1 + b1, w2 + b2):
        if a is not None:
            assert torch.equal(a, b)
    torch.testing.assert_close(s1, s2, equal_nan=True)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("trust_norm", ["sum", "update"])
def test_stats_are_the_norms_and_ratios_the_step_used(impl, trust_norm):
    weights, grads, _ = _inputs()
    weights[1].zero_()  # the fallback: lam = 1
    params = [w.clone() for w in weights]
    stats = torch.full((len(params), 3), -1.0)
    lr, eta, wd, eps = 0.4, 0.5, 0.01, 1e-8
    F.lars(params, grads, [None] * len(params), lr=lr, eta=eta, weight_decay=wd, trust_norm=trust_norm,
           impl=impl, stats=stats)
    for i, (w, g) in enumerate(zip(weights, grads)):
        w_norm, g_norm = w.double().norm(), g.double().norm()
        u_norm = (g.double() + wd * w.double()).norm()
        denominator = g_norm + wd * w_norm + eps if trust_norm == "sum" else u_norm + eps
        lam = eta * w_norm / denominator if w_norm > 0 and g_norm > 0 else torch.tensor(1.0)
        torch.testing.assert_close(stats[i].double(), torch.stack([w_norm, g_norm, lam]), rtol=1e-5, atol=0)
        # and it is the ratio of the update actually made
        torch.testing.assert_close(params[i], weights[i] - lr * stats[i, 2] * (grads[i] + wd * weights[i]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
def test_stats_of_a_group_without_trust_ratio(impl):
    weights, grads, _ = _inputs()
    stats = torch.zeros(len(weights), 3)
    F.lars(weights, grads, [None] * len(weights), lr=0.1, adapt=False, impl=impl, stats=stats)
    assert torch.isnan(stats[:, :2]).all() and torch.equal(stats[:, 2], torch.ones(len(weights)))


def test_stats_rows_of_tensors_on_different_paths():
    """One call split over the kernel (float32), foreach (a master copy) and the reference (sparse)."""
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(6, 4, generator=generator)
    low = torch.randn(5, generator=generator).to(torch.bfloat16)
    table = torch.randn(8, 3, generator=generator)
    grads = [torch.randn(6, 4, generator=generator), torch.randn(5, generator=generator).to(torch.bfloat16),
             torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 3, generator=generator), (8, 3))]
    params = [dense.clone(), low.clone(), table.clone()]
    masters = [None, low.float(), None]
    stats = torch.zeros(3, 3)
    F.lars(params, grads, [None] * 3, lr=0.1, eta=0.5, master_params=masters, stats=stats)
    for i, (w, g) in enumerate(zip([dense, low.float(), table], grads)):
        g = g.to_dense().float()
        assert torch.allclose(stats[i, :2], torch.stack([w.norm(), g.norm()]), rtol=1e-5)


def test_a_missing_momentum_buffer_is_a_first_step():
    """None buffers with momentum: created in the list (param dtype; float32 beside a master) and
    equal to starting from zeros."""
    weights, grads, _ = _inputs()
    for impl in ("reference", "foreach", "fused"):
        params, zeros_run = [w.clone() for w in weights], [w.clone() for w in weights]
        buffers = [None] * len(params)
        zeros = [torch.zeros_like(w) for w in weights]
        for form in ("paper", "torch"):
            F.lars(params, grads, buffers, lr=0.3, momentum=0.9, momentum_form=form, impl=impl)
            F.lars(zeros_run, grads, zeros, lr=0.3, momentum=0.9, momentum_form=form, impl=impl)
            assert all(torch.equal(a, b) for a, b in zip(params + buffers, zeros_run + zeros))
    low = [w.to(torch.bfloat16) for w in weights]
    buffers = [None] * len(low)
    F.lars(low, [g.to(torch.bfloat16) for g in grads], buffers, lr=0.3, momentum=0.9,
           master_params=[w.clone() for w in weights])
    assert all(b.dtype == torch.float32 and b.shape == w.shape for b, w in zip(buffers, weights))


def test_a_state_saved_before_an_option_existed_loads_with_its_default(monkeypatch):
    """A saved group lacking an option added after the first release takes the option's default."""
    param = torch.zeros(3, requires_grad=True)
    opt = larsopt.LARS([param], lr=0.1, momentum=0.9)
    saved = opt.state_dict()
    del saved["param_groups"][0]["stochastic_rounding"]
    field = next(f for f in dataclasses.fields(O.LarsOptions) if f.name == "stochastic_rounding")
    option = dataclasses.replace(field.metadata["option"], saved_since_first_release=False)
    monkeypatch.setitem(O._FIELDS, "stochastic_rounding", option)
    fresh = larsopt.LARS([param], lr=0.5, stochastic_rounding=True)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["stochastic_rounding"] is False and fresh.param_groups[0]["lr"] == 0.1
    del saved["param_groups"][0]["eta"]
    with pytest.raises(ValueError, match="eta"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize("impl", ["auto", "foreach", "reference"])
def test_optimizer_telemetry_is_the_step_stats_by_param_name(impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    opt = larsopt.LARS(larsopt.param_groups(model, exclude="norm_and_bias"), lr=0.2, momentum=0.9, eta=0.02,
                       weight_decay=1e-3, impl=impl, telemetry=True)
    model(torch.randn(8, 6)).square().mean().backward()
    model[2].bias.grad = None  # not stepped: not reported
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    opt.step()
    telemetry = opt.telemetry()
    assert sorted(telemetry) == sorted(grads)
    values = telemetry.to_dict()
    for name in ("0.weight", "2.weight"):
        w_norm, g_norm = weights[name].norm(), grads[name].norm()
        lam = 0.02 * w_norm / (g_norm + 1e-3 * w_norm + 1e-8)
        assert values[name]["w_norm"] == pytest.approx(w_norm.item(), rel=1e-6)
        assert values[name]["g_norm"] == pytest.approx(g_norm.item(), rel=1e-6)
        assert values[name]["trust_ratio"] == pytest.approx(lam.item(), rel=1e-5)
    assert values["1.weight"]["trust_ratio"] == 1.0 and telemetry["0.bias"][2].item() == 1.0
    torch.testing.assert_close(telemetry.column("w_norm")[0], weights["0.weight"].norm())


def test_telemetry_needs_to_be_asked_for():
    opt = larsopt.LARS([torch.zeros(3, requires_grad=True)])
    with pytest.raises(RuntimeError, match="telemetry=True"):
        opt.telemetry()
    with pytest.raises(ValueError, match="telemetry"):
        larsopt.LARS([torch.zeros(3, requires_grad=True)], telemetry="yes")


def test_lars_constructor_takes_every_option_with_its_declared_default():
    """LARS's signature lists each option it exposes (every group key but 'lars', a group-only key) with
    the declared default, and a value given there reaches the param groups."""
    import inspect

    parameters = inspect.signature(larsopt.LARS.__init__).parameters
    defaults = O.group_defaults()
    for key, default in defaults.items():
        if key == "lars":
            continue
        assert key in parameters, f"LARS.__init__ lacks {key}"
        assert parameters[key].default == default or parameters[key].default is default, key
    for name, case in OPTIONS.items():
        key = O._GROUP_KEYS.get(name)
        if key is None or key == "lars":
            continue
        value = case.values[0]
        extra = dict(case.base)
        optimizer = larsopt.LARS([torch.zeros(3, requires_grad=True)], **{**extra, key: value})
        assert optimizer.param_groups[0][key] is value or optimizer.param_groups[0][key] == value, key


def test_stats_of_the_wrong_shape_are_refused_before_any_update():
    params = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="stats"):
        F.lars(params, [torch.ones(3), torch.ones(2)], [None, None], lr=0.1, stats=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="stats"):
        F.lars(params, [torch.ones(3), torch.ones(2)], [None, None], lr=0.1, stats=torch.zeros(2, 3, dtype=torch.int64))
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)


def test_numpy_scalars_are_numbers_and_wrong_types_are_type_errors():
    """Issue 15 item 11: real numbers of any kind are accepted (and stored as Python numbers, as torch's
    optimizers keep them); a wrong type raises TypeError, a bad value ValueError, on both front-ends."""
    np = pytest.importorskip("numpy")
    param = torch.zeros(3, requires_grad=True)
    optimizer = larsopt.LARS([param], lr=np.float32(0.5), momentum=np.float64(0.9), weight_decay=np.int64(0),
                             eta=np.float32(0.01))
    group = optimizer.param_groups[0]
    assert all(type(group[key]) in (int, float) for key in ("lr", "momentum", "weight_decay", "eta"))
    optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": np.float32(0.25)})
    assert type(optimizer.param_groups[1]["lr"]) is float
    param.grad = torch.ones(3)
    optimizer.step()
    F.lars([torch.zeros(3)], [torch.ones(3)], [None], lr=np.float32(0.1), momentum=np.float64(0.5))
    for name, bad in (("lr", "0.1"), ("momentum", None), ("nesterov", "yes"), ("clip_gradient", "1")):
        with pytest.raises(TypeError, match=name):
            larsopt.LARS([param], **{name: bad})
        with pytest.raises(TypeError, match=name):
            F.lars([torch.zeros(3)], [torch.ones(3)], [None], **{"lr": 0.1, name: bad})
    for name, bad in (("lr", -1.0), ("momentum", 1.0), ("clip_gradient", -1.0)):
        with pytest.raises(ValueError, match=name) as raised:
            larsopt.LARS([param], **{name: bad})
        assert not isinstance(raised.value, TypeError)
