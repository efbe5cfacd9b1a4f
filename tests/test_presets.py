"""Every preset against its peer: the real peer's code where it installs (timm, pytorch-optimizer,
Lightning Bolts, optax; the ``peers`` group), an independent float64 transcription of its published
source where it does not (apex LARC, the MLPerf TF2 optimizer, FAIR SSL). Same inputs into both,
several steps with the lr changed between steps, random configurations over every flag, zero weights
and zero gradients, several groups: equal to 1e-9 of the update in float64."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from larsopt import presets
from peer_sources import bolts_lars, pytorch_optimizer_lars, timm_lars

pytestmark = pytest.mark.peers
SHAPES = {"conv.weight": (4, 3, 2, 2), "conv.bias": (4,), "fc.weight": (5, 6), "fc.bias": (5,), "norm.weight": (6,),
          "zero.weight": (3, 3), "still.weight": (2, 4), "scale": ()}
ZERO_WEIGHT, ZERO_GRAD = "zero.weight", "still.weight"
STEPS, LRS = 4, (0.7, 0.35, 0.5, 0.2)
TOLERANCE = 1e-9
CONFIGS = 24


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    weights[ZERO_WEIGHT].zero_()
    return weights


def _grads(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed + 1)
    steps = []
    for _ in range(STEPS):
        grads = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
        grads[ZERO_GRAD].zero_()
        steps.append(grads)
    return steps


def _split(names: list[str]) -> tuple[list[str], list[str]]:
    """Two groups: the weights, and the 1-D / 0-D tensors."""
    return [n for n in names if len(SHAPES[n]) > 1], [n for n in names if len(SHAPES[n]) <= 1]


def _trajectory(make, seed: int, groups: list[dict] | None, named: bool = False) -> dict[str, torch.Tensor]:
    """Step ``make(params) -> optimizer`` over the fixed gradients with lr changing every step; the
    final weights. ``groups``: per-group settings (their ``names`` pick the tensors)."""
    params = {name: torch.nn.Parameter(value.clone()) for name, value in _weights(seed).items()}

    def members(names):
        return [(n, params[n]) for n in names] if named else [params[n] for n in names]

    if groups is None:
        optimizer = make(members(list(params)))
    else:
        optimizer = make([{**{k: v for k, v in g.items() if k != "names"}, "params": members(g["names"])}
                          for g in groups])
    for step, grads in enumerate(_grads(seed)):
        for name, param in params.items():
            param.grad = grads[name].clone()
        for group in optimizer.param_groups:
            group["lr"] = LRS[step] * group.get("lr_scale", 1.0)
        optimizer.step()
    return {name: param.detach() for name, param in params.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], seed: int, label: str) -> None:
    start = _weights(seed)
    for name in want:
        change = (want[name] - start[name]).norm()
        error = (got[name] - want[name]).norm()
        relative = error / change if change > 0 else error
        assert relative <= TOLERANCE, f"{label}: {name} off by {relative:.3g} of its update"


def _configs(space: dict[str, tuple], count: int = CONFIGS, seed: int = 0, valid=lambda c: True) -> list[dict]:
    """``count`` random configurations over ``space`` (derandomized), each passing ``valid``."""
    rng = random.Random(seed)
    configs: list[dict] = []
    while len(configs) < count:
        config = {name: rng.choice(values) for name, values in space.items()}
        if valid(config):
            configs.append(config)
    return configs


def _no_nesterov_without_momentum(config: dict) -> bool:
    return not config.get("nesterov") or (config.get("momentum", 0) > 0 and config.get("dampening", 0) == 0)


# ----------------------------------------------------------------------------------------------
# timm, pytorch-optimizer, Lightning Bolts: their own classes
# ----------------------------------------------------------------------------------------------

TIMM_SPACE = dict(momentum=(0.0, 0.9), dampening=(0.0, 0.3), weight_decay=(0.0, 0.01, 0.1), nesterov=(False, True),
                  trust_coeff=(0.001, 0.05), eps=(1e-8, 0.05), trust_clip=(False, True), always_adapt=(False, True))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_timm(index):
    Lars = timm_lars()
    if Lars is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    config = _configs(TIMM_SPACE, valid=_no_nesterov_without_momentum)[index]
    weights, others = _split(list(SHAPES))
    # a second group without weight decay: the trust ratio there only with always_adapt
    groups = [{"names": weights}, {"names": others, "weight_decay": 0.0}]
    for foreach in (False, True):
        want = _trajectory(lambda p: Lars(p, **config, foreach=foreach), index, groups)
        got = _trajectory(lambda p: presets.timm(p, **config), index, groups)
        _assert_same(got, want, index, f"timm foreach={foreach} {config}")


PYOPT_SPACE = dict(weight_decay=(0.0, 0.01, 0.1), momentum=(0.0, 0.9), dampening=(0.0, 0.3),
                   trust_coefficient=(1e-3, 0.05), nesterov=(False, True), maximize=(False, True))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_pytorch_optimizer(index):
    LARS = pytorch_optimizer_lars()
    if LARS is None:
        pytest.skip("pytorch-optimizer is not installed")
    config = _configs(PYOPT_SPACE, seed=1, valid=lambda c: not c["nesterov"] or c["momentum"] > 0)[index]
    for foreach in (False, True):
        want = _trajectory(lambda p: LARS(p, **config, foreach=foreach), index, None)
        got = _trajectory(lambda p: presets.pytorch_optimizer(p, **config), index, None)
        _assert_same(got, want, index, f"pytorch_optimizer foreach={foreach} {config}")


BOLTS_SPACE = dict(momentum=(0.0, 0.9), dampening=(0.0, 0.3), weight_decay=(0.0, 0.01, 0.1), nesterov=(False, True),
                   trust_coefficient=(0.001, 0.05), eps=(1e-8, 0.05))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_bolts(index):
    LARS = bolts_lars()
    if LARS is None:
        pytest.skip("lightning-bolts is not installed (pip install --no-deps lightning-bolts)")
    config = _configs(BOLTS_SPACE, seed=2, valid=_no_nesterov_without_momentum)[index]
    weights, others = _split(list(SHAPES))
    groups = [{"names": weights}, {"names": others, "weight_decay": 0.0}]
    want = _trajectory(lambda p: LARS(p, lr=0.1, **config), index, groups)
    got = _trajectory(lambda p: presets.bolts(p, 0.1, **config), index, groups)
    _assert_same(got, want, index, f"bolts {config}")


# ----------------------------------------------------------------------------------------------
# optax: its own lars in JAX (float64), params as a dict keyed by name
# ----------------------------------------------------------------------------------------------

OPTAX_SPACE = dict(weight_decay=(0.0, 0.01, 0.1), trust_coefficient=(0.001, 0.05), eps=(0.0, 0.05),
                   momentum=(0.0, 0.9), nesterov=(False, True), masks=("none", "bool", "callable"))


def _optax_masks(kind: str):
    """(weight_decay_mask, trust_ratio_mask) as larsopt takes them: True, bools, or name rules."""
    if kind == "none":
        return True, True
    if kind == "bool":
        return False, True
    return (lambda name, p: not name.endswith("bias")), (lambda name, p: p.ndim > 1)


@pytest.mark.parametrize("index", range(CONFIGS))
def test_optax(index):
    optax = pytest.importorskip("optax", reason="optax is not installed")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    config = _configs(OPTAX_SPACE, seed=3, valid=lambda c: not c["nesterov"] or c["momentum"] > 0)[index]
    masks = config.pop("masks")
    wd_mask, tr_mask = _optax_masks(masks)
    weights = _weights(index)

    def tree_mask(mask):
        if isinstance(mask, bool):
            return mask
        return lambda params: {name: mask(name, weights[name]) for name in params}

    # (masks are static: inject_hyperparams would take a callable for a schedule)
    lars = optax.inject_hyperparams(optax.lars, static_args=("weight_decay_mask", "trust_ratio_mask"))
    transform = lars(learning_rate=LRS[0], weight_decay_mask=tree_mask(wd_mask),
                                                     trust_ratio_mask=tree_mask(tr_mask), **config)
    params = {name: jnp.asarray(value.numpy()) for name, value in weights.items()}
    state = transform.init(params)
    for step, grads in enumerate(_grads(index)):
        state.hyperparams["learning_rate"] = jnp.asarray(LRS[step])
        updates, state = transform.update({n: jnp.asarray(g.numpy()) for n, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    want = {name: torch.tensor(jax.device_get(value)) for name, value in params.items()}
    got = _trajectory(lambda p: presets.optax(p, LRS[0], weight_decay_mask=wd_mask, trust_ratio_mask=tr_mask,
                                              **config), index, None, named=True)
    _assert_same(got, want, index, f"optax masks={masks} {config}")


# ----------------------------------------------------------------------------------------------
# apex LARC, MLPerf TF2, FAIR SSL: float64 transcriptions of their published sources
# ----------------------------------------------------------------------------------------------

class _TranscribedSGD:
    """A minimal optimizer over named float64 tensors that runs ``update(name, w, g, group, state)``."""

    def __init__(self, params, update, **defaults):
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **group} for group in groups]
        self.state: dict[int, dict] = {}
        self.update = update

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for member in group["params"]:
                name, p = member if isinstance(member, tuple) else (None, member)
                if p.grad is not None:
                    self.update(name, p, p.grad.clone(), group, self.state.setdefault(id(p), {}))


def _larc_update(trust_coefficient, clip, eps):
    """NVIDIA/apex ``apex/parallel/LARC.py`` (as last published, 2019-2024) around torch.optim.SGD:
    the inner SGD's weight decay is zeroed during the step; where |w| and |g| are not 0 the gradient
    becomes (g + wd w) * a, a = c |w| / (|g| + wd |w| + eps), clipped to min(a / lr, 1); then SGD."""
    def update(name, p, g, group, state):
        wd = group["weight_decay"]
        w_norm, g_norm = p.norm(), g.norm()
        if w_norm != 0 and g_norm != 0:
            a = trust_coefficient * w_norm / (g_norm + w_norm * wd + eps)
            if clip:
                a = min(a / group["lr"], 1)
            g = (g + wd * p) * a
        _torch_sgd(p, g, group, state)
    return update


def _torch_sgd(p, d_p, group, state):
    """torch.optim.SGD's step without weight decay (torch 2.13 ``_single_tensor_sgd``)."""
    momentum, dampening = group["momentum"], group["dampening"]
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d_p.clone()
        else:
            buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
        d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
    p.add_(d_p, alpha=-group["lr"])


LARC_SPACE = dict(momentum=(0.0, 0.9), dampening=(0.0, 0.3), weight_decay=(0.0, 0.01, 0.1), nesterov=(False, True),
                  trust_coefficient=(0.02, 0.001), clip=(True, False), eps=(1e-8, 0.05))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_larc(index):
    config = _configs(LARC_SPACE, seed=4, valid=_no_nesterov_without_momentum)[index]
    sgd = {k: config[k] for k in ("momentum", "dampening", "weight_decay", "nesterov")}
    weights, others = _split(list(SHAPES))
    groups = [{"names": weights}, {"names": others, "weight_decay": 0.0}]
    update = _larc_update(config["trust_coefficient"], config["clip"], config["eps"])
    want = _trajectory(lambda p: _TranscribedSGD(p, update, lr=0.1, **sgd), index, groups)
    got = _trajectory(lambda p: presets.larc(p, 0.1, **config), index, groups)
    _assert_same(got, want, index, f"larc {config}")


def _mlperf_update(momentum, weight_decay, eeta, epsilon, skip_list, use_nesterov):
    """mlcommons/training ``retired_benchmarks/resnet-tf2/tensorflow2/lars_optimizer.py``
    (``LARSOptimizer._apply_dense`` / ``compute_lr``): epsilon = epsilon or 1e-7 (Keras's default);
    skipped variables (name contains a skip_list entry) get neither ratio nor weight decay."""
    epsilon = epsilon or 1e-7

    def update(name, p, g, group, state):
        lr = group["lr"]
        if skip_list is None or not any(v in name for v in skip_list):
            w_norm, g_norm = p.norm(), g.norm()
            trust = eeta * w_norm / (g_norm + weight_decay * w_norm + epsilon) if w_norm > 0 and g_norm > 0 else 1.0
            scaled_lr = lr * trust
            g = g + weight_decay * p
        else:
            scaled_lr = lr
        mom = state.setdefault("momentum", torch.zeros_like(p))
        mom.mul_(momentum).sub_(scaled_lr * g)
        if use_nesterov:
            p.add_(momentum * mom - scaled_lr * g)
        else:
            p.add_(mom)
    return update


MLPERF_SPACE = dict(momentum=(0.0, 0.9), weight_decay=(0.0, 0.0001, 0.1), eeta=(0.001, 0.05), epsilon=(0.0, 0.05),
                    skip_list=(None, ["bias", "norm"]), use_nesterov=(False, True))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_mlperf(index):
    config = _configs(MLPERF_SPACE, seed=5, valid=lambda c: not c["use_nesterov"] or c["momentum"] > 0)[index]
    want = _trajectory(lambda p: _TranscribedSGD(p, _mlperf_update(**config), lr=0.1), index, None, named=True)
    got = _trajectory(lambda p: presets.mlperf(p, 0.1, **config), index, None, named=True)
    _assert_same(got, want, index, f"mlperf {config}")


def _ssl_update(name, p, g, group, state):
    """facebookresearch/barlowtwins ``main.py`` ``LARS.step`` (2021): filters exclude ndim == 1."""
    if not group["weight_decay_filter"] or p.ndim != 1:
        g = g.add(p, alpha=group["weight_decay"])
    if not group["lars_adaptation_filter"] or p.ndim != 1:
        w_norm, u_norm = torch.norm(p), torch.norm(g)
        one = torch.ones_like(w_norm)
        q = torch.where(w_norm > 0., torch.where(u_norm > 0, group["eta"] * w_norm / u_norm, one), one)
        g = g.mul(q)
    mu = state.setdefault("mu", torch.zeros_like(p))
    mu.mul_(group["momentum"]).add_(g)
    p.add_(mu, alpha=-group["lr"])


SSL_SPACE = dict(weight_decay=(0.0, 1e-6, 0.1), momentum=(0.0, 0.9), eta=(0.001, 0.05),
                 weight_decay_filter=(False, True), lars_adaptation_filter=(False, True))


@pytest.mark.parametrize("index", range(CONFIGS))
def test_ssl(index):
    config = _configs(SSL_SPACE, seed=6)[index]
    weights, others = _split(list(SHAPES))
    # Barlow Twins' own grouping: weights, then biases and norm layers with both filters on
    groups = [{"names": weights}, {"names": others, "weight_decay_filter": True, "lars_adaptation_filter": True}]
    want = _trajectory(lambda p: _TranscribedSGD(p, _ssl_update, lr=0.1, **config), index, groups)
    got = _trajectory(lambda p: presets.ssl(p, 0.1, **config), index, groups)
    _assert_same(got, want, index, f"ssl {config}")


# ----------------------------------------------------------------------------------------------
# MXNet 2.0: the larsopt.mxnet front-end (itself checked against MXNet's goldens)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum,wd,clip,rescale", list(itertools.product((0.0, 0.9), (0.0, 1e-3), (None, 0.5),
                                                                            (1.0, 0.5))))
def test_mxnet(momentum, wd, clip, rescale):
    from larsopt import mxnet as lmx

    names = list(SHAPES)
    kwargs = dict(momentum=momentum, eta=0.01, epsilon=1e-8, rescale_grad=rescale, clip_gradient=clip)
    opt = lmx.LARS(learning_rate=LRS[0], wd=wd, param_idx2name=dict(enumerate(names)), **kwargs)
    updater = lmx.get_updater(opt)
    weights = [w.clone() for w in _weights(0).values()]
    for step, grads in enumerate(_grads(0)):
        opt.set_learning_rate(LRS[step])
        updater(list(range(len(names))), [grads[n] for n in names], weights)
    want = dict(zip(names, weights))
    got = _trajectory(lambda p: presets.mxnet(p, LRS[0], wd=wd, **kwargs), 0, None, named=True)
    _assert_same(got, want, 0, f"mxnet {kwargs}")


# ----------------------------------------------------------------------------------------------
# Signatures, name rules, and larsopt's guarantees on every preset
# ----------------------------------------------------------------------------------------------

SIGNATURES = {
    "timm": "lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coeff=0.001, eps=1e-08, "
            "trust_clip=False, always_adapt=False, foreach=None",
    "pytorch_optimizer": "lr=0.001, weight_decay=0.0, momentum=0.9, dampening=0.0, trust_coefficient=0.001, "
                         "nesterov=False, foreach=None, maximize=False",
    "bolts": "lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coefficient=0.001, eps=1e-08",
    "larc": "lr=0.001, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coefficient=0.02, clip=True, "
            "eps=1e-08",
    "optax": "learning_rate, weight_decay=0.0, weight_decay_mask=True, trust_coefficient=0.001, eps=0.0, "
             "trust_ratio_mask=True, momentum=0.9, nesterov=False",
    "mlperf": "learning_rate, momentum=0.9, weight_decay=0.0001, eeta=0.001, epsilon=0.0, name='LARSOptimizer', "
              "skip_list=None, use_nesterov=False",
    "ssl": "lr, weight_decay=0, momentum=0.9, eta=0.001, weight_decay_filter=False, lars_adaptation_filter=False",
    "mxnet": "learning_rate=0.1, momentum=0.0, eta=0.001, epsilon=1e-08, wd=0.0, rescale_grad=1.0, "
             "clip_gradient=None, multi_precision=False",
}


@pytest.mark.parametrize("peer", list(SIGNATURES))
def test_signature_is_the_peers(peer):
    import inspect

    parameters = list(inspect.signature(getattr(presets, peer)).parameters.values())[1:]
    shown = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                      for p in parameters)
    assert shown == SIGNATURES[peer]


def test_name_rules_need_names():
    tensors = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="named_parameters"):
        presets.mlperf(tensors, 0.1, skip_list=["bias"])
    with pytest.raises(ValueError, match="named_parameters"):
        presets.optax(tensors, 0.1, trust_ratio_mask=lambda name, p: True)
    with pytest.raises(ValueError, match="named_parameters"):
        presets.mxnet(tensors)


MAKERS = {
    "timm": lambda p: presets.timm(p, lr=0.5, momentum=0.9, weight_decay=0.01),
    "pytorch_optimizer": lambda p: presets.pytorch_optimizer(p, lr=0.5, weight_decay=0.01),
    "bolts": lambda p: presets.bolts(p, 0.5, momentum=0.9, weight_decay=0.01),
    "larc": lambda p: presets.larc(p, 0.5, momentum=0.9, weight_decay=0.01),
    "optax": lambda p: presets.optax(p, 0.5, weight_decay=0.01),
    "mlperf": lambda p: presets.mlperf(p, 0.5, skip_list=["bias"]),
    "ssl": lambda p: presets.ssl(p, 0.5, weight_decay=0.01),
    "mxnet": lambda p: presets.mxnet(p, 0.5, momentum=0.9, wd=0.01),
}


@pytest.mark.parametrize("peer", list(MAKERS))
def test_presets_keep_larsopts_guarantees(peer):
    """p.grad untouched, a state_dict round trip that continues identically, every impl the same."""
    results = {}
    for impl in ("reference", "foreach", "auto"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        optimizer = MAKERS[peer](list(model.named_parameters()))
        for group in optimizer.param_groups:
            group["impl"] = impl
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4, generator=generator)).square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            if step == 1:
                saved = optimizer.state_dict()
                clone = MAKERS[peer](list(model.named_parameters()))
                clone.load_state_dict(saved)
                for group in clone.param_groups:
                    group["impl"] = impl  # (the one setting a load keeps from the loading optimizer)
                assert clone.state_dict()["param_groups"] == saved["param_groups"]
            optimizer.step()
            assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
        results[impl] = [p.detach().clone() for p in model.parameters()]
    for impl in ("foreach", "auto"):
        for a, b in zip(results[impl], results["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mlperf_epsilon_zero_runs_as_keras_default():
    optimizer = presets.mlperf([("w", torch.zeros(2, requires_grad=True))], 0.1)
    assert all(math.isclose(group["epsilon"], 1e-7) for group in optimizer.param_groups)


def test_presets_accept_and_refuse_what_their_peers_do():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    # torch SGD's groups: nesterov in a group without momentum does nothing, and is accepted
    for make in (lambda p: presets.timm(p, momentum=0.9, nesterov=True),
                 lambda p: presets.bolts(p, 0.1, momentum=0.9, nesterov=True),
                 lambda p: presets.larc(p, momentum=0.9, nesterov=True),
                 lambda p: presets.pytorch_optimizer(p, momentum=0.9, nesterov=True)):
        optimizer = make([{"params": [a]}, {"params": [b], "momentum": 0}])
        assert [group["nesterov"] for group in optimizer.param_groups] == [True, False]
    presets.pytorch_optimizer([a], momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match=r"presets.pytorch_optimizer: Invalid dampening: 1.0.*\[0, 1\)"):
        presets.pytorch_optimizer([a], dampening=1.0)
    with pytest.raises(ValueError, match="presets.timm: Invalid trust_coeff"):
        presets.timm([a], trust_coeff=-1.0)
    with pytest.raises(ValueError, match="presets.bolts: Invalid eps"):
        presets.bolts([a], 0.1, eps=-1.0)
    with pytest.raises(ValueError, match=r"presets.timm: param group key\(s\) \['eta'\] are larsopt settings"):
        presets.timm([{"params": [a], "eta": 3.0}])
    optimizer = presets.optax([a], 0.1, weight_decay=0.1, weight_decay_mask=None, trust_ratio_mask=None)
    assert all(group["lars"] and group["weight_decay"] == 0.1 for group in optimizer.param_groups)


def test_settings_of_how_a_step_runs_are_welcome_in_a_peers_group():
    a = torch.zeros(3, requires_grad=True)
    optimizer = presets.timm([{"params": [a], "telemetry": True, "impl": "reference"}], weight_decay=0.1)
    a.grad = torch.ones(3)
    optimizer.step()
    assert list(optimizer.telemetry()) == ["group0.0"]
