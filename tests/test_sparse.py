"""Sparse (row) gradients: lazy and dense semantics against a float64 reference."""

import pytest
import torch

import larsopt

HYPER = dict(lr=0.2, momentum=0.9, eta=0.05, weight_decay=0.01)


def _reference_step(w, g_dense, rows, buf, lazy, lr, momentum, eta, weight_decay):
    """float64 paper-form LARS, sum norm; only `rows` change when lazy (written for the test)."""
    w, g, buf = w.double(), g_dense.double(), buf.double()
    w_norm, g_norm = w.norm(), g.norm()
    lam = eta * w_norm / (g_norm + weight_decay * w_norm + 1e-8) if w_norm > 0 and g_norm > 0 else 1.0
    new_buf = momentum * buf - lr * lam * (g + weight_decay * w)
    new_w = w + new_buf
    if lazy:
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[rows] = False
        new_w[keep], new_buf[keep] = w[keep], buf[keep]
    return new_w, new_buf


def _sparse(rows, values, num_rows):
    indices = torch.tensor([rows], dtype=torch.long).reshape(1, -1)
    return torch.sparse_coo_tensor(indices, values, (num_rows, values.shape[1]), check_invariants=True)


@pytest.mark.parametrize("lazy", [True, False])
def test_sparse_steps_against_float64_reference(lazy):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 4, generator=gen, requires_grad=True)
    opt = larsopt.LARS([w], lazy_update=lazy, **HYPER)
    ref_w, ref_buf = w.detach().double(), torch.zeros(10, 4, dtype=torch.float64)
    for rows in ([1, 3, 3, 7], [0, 1], [9], []):  # duplicates summed; an empty gradient last
        values = torch.randn(len(rows), 4, generator=gen)
        w.grad = _sparse(rows, values, 10)
        opt.step()
        ref_w, ref_buf = _reference_step(ref_w, w.grad.to_dense(), rows, ref_buf, lazy, **HYPER)
        assert torch.allclose(w.detach().double(), ref_w, rtol=0, atol=1e-6)
        assert torch.allclose(opt.state[w]["momentum_buffer"].double(), ref_buf, rtol=0, atol=1e-6)


def test_lazy_update_leaves_untouched_rows_alone():
    w = torch.randn(6, 3, requires_grad=True)
    start = w.detach().clone()
    opt = larsopt.LARS([w], **HYPER)
    w.grad = _sparse([2, 4], torch.randn(2, 3), 6)
    opt.step()
    untouched = [0, 1, 3, 5]
    assert torch.equal(w.detach()[untouched], start[untouched])
    assert torch.equal(opt.state[w]["momentum_buffer"][untouched], torch.zeros(4, 3))
    assert not torch.equal(w.detach()[[2, 4]], start[[2, 4]])


def test_non_lazy_equals_the_dense_update_exactly():
    w_sparse = torch.randn(8, 5, requires_grad=True)
    w_dense = w_sparse.detach().clone().requires_grad_()
    opt_sparse = larsopt.LARS([w_sparse], lazy_update=False, trust_norm="update", **HYPER)
    opt_dense = larsopt.LARS([w_dense], trust_norm="update", **HYPER)
    for rows in ([1, 1, 5], [0, 7], []):
        grad = _sparse(rows, torch.randn(len(rows), 5), 8)
        w_sparse.grad, w_dense.grad = grad, grad.to_dense()
        opt_sparse.step()
        opt_dense.step()
        assert torch.equal(w_sparse, w_dense)


def test_embedding_with_sparse_gradients_trains():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = larsopt.LARS(emb.parameters(), lr=1.0, momentum=0.9, eta=0.1)
    ids = torch.tensor([1, 2, 2, 9])
    before = emb.weight.detach().clone()
    loss = emb(ids).pow(2).sum()
    loss.backward()
    opt.step()
    assert emb(ids).pow(2).sum() < loss
    assert torch.equal(emb.weight.detach()[10:], before[10:])


def test_fully_sparse_gradient_needs_lazy_update_off():
    w = torch.randn(4, 4, requires_grad=True)
    w.grad = torch.eye(4).to_sparse()  # sparse_dim == 2
    opt = larsopt.LARS([w], **HYPER)
    with pytest.raises(RuntimeError, match="sparse_dim=2"):
        opt.step()
    opt = larsopt.LARS([w], lazy_update=False, **HYPER)
    opt.step()
