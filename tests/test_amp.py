"""torch.amp.GradScaler drives larsopt.LARS: scale-free trust ratio, sync-free inf skip."""

import copy

import torch

import larsopt


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _batches(n=5):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(n)]


def _train(model, opt, scaler=None, batches=5, unscale_first=False):
    """Train on the fixed batches; with a scaler, optionally unscale before the step (as for clipping)."""
    for x, y in _batches(batches):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()


def test_grad_scaler_gives_the_unscaled_trajectory():
    """A power-of-two scale is exact in float32, so scaled and unscaled training are bit-equal."""
    plain, scaled = _model(), _model()
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, eta=0.02)
    _train(plain, larsopt.LARS(plain.parameters(), **kw))
    _train(scaled, larsopt.LARS(scaled.parameters(), **kw), torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_after_unscale_for_clipping():
    plain, scaled = _model(), _model()
    _train(plain, larsopt.LARS(plain.parameters(), lr=0.5, momentum=0.9), batches=3)
    _train(scaled, larsopt.LARS(scaled.parameters(), lr=0.5, momentum=0.9),
           torch.amp.GradScaler("cpu", init_scale=2.0**8), batches=3, unscale_first=True)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)


def test_inf_gradient_skips_the_step_and_keeps_state():
    model = _model()
    opt = larsopt.LARS(model.parameters(), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _train(model, opt, scaler)
    weights = copy.deepcopy([p.detach() for p in model.parameters()])
    state = copy.deepcopy(opt.state_dict()["state"])
    x, y = _batches(1)[0]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
    for key, value in opt.state_dict()["state"].items():
        assert torch.equal(value["momentum_buffer"], state[key]["momentum_buffer"])
