"""Row-sparse gradients (torch sparse COO, sparse_dim == 1) in lmx.LARS: MXNet's row_sparse semantics.

Spec §5.6: the trust ratio uses |w| over all rows and |g| over the stored rows. With
``lazy_update=True`` (fused path) only the stored rows change: weight, momentum and weight decay;
otherwise the result is the dense update with zero rows.
"""

import numpy as np
import pytest
import torch

from larsopt import mxnet as lmx

ROWS = [1, 3]
LR, WD, ETA, MOMENTUM, RESCALE = 0.5, 0.1, 0.01, 0.9, 0.5


def row_sparse(values: np.ndarray, rows, num_rows: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.from_numpy(values), (num_rows, values.shape[1]),
                                   check_invariants=True)


def reference(w, mom, grad_rows_per_step, *, lazy):
    """Float64 MXNet row_sparse LARS with momentum: weights and momenta after each step."""
    w, mom = w.astype(np.float64), mom.astype(np.float64)
    for grad_rows in grad_rows_per_step:
        dense = np.zeros_like(w)
        dense[ROWS] = grad_rows
        w_norm = np.sqrt((w ** 2).sum())
        g_norm = RESCALE * np.sqrt((grad_rows.astype(np.float64) ** 2).sum())
        lam = ETA * w_norm / (g_norm + WD * w_norm + 1e-8)
        update = RESCALE * dense + WD * w
        new_mom = MOMENTUM * mom - LR * lam * update
        if lazy:
            mom[ROWS] = new_mom[ROWS]
            w[ROWS] = w[ROWS] + mom[ROWS]
        else:
            mom = new_mom
            w = w + mom
    return w, mom


@pytest.mark.parametrize("lazy_update,use_fused_step", [(True, True), (False, True), (False, False)])
def test_row_sparse_gradient(lazy_update, use_fused_step):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grad_rows = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    opt = lmx.LARS(learning_rate=LR, wd=WD, eta=ETA, momentum=MOMENTUM, rescale_grad=RESCALE,
                   lazy_update=lazy_update, use_fused_step=use_fused_step)
    w = torch.from_numpy(w0.copy())
    mom = opt.create_state(0, w)
    grads = [row_sparse(g, ROWS, 5) for g in grad_rows]
    grads_before = [g.clone() for g in grads]
    for g in grads:
        opt.update([0], [w], [g], [mom])
    want_w, want_mom = reference(w0, np.zeros_like(w0), grad_rows, lazy=lazy_update)
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mom.numpy(), want_mom, rtol=1e-5, atol=1e-7)
    if lazy_update:
        untouched = [0, 2, 4]
        np.testing.assert_array_equal(w.numpy()[untouched], w0[untouched])
        assert not mom[untouched].any()
    for g, before in zip(grads, grads_before):
        assert torch.equal(g.to_dense(), before.to_dense())


def test_lazy_sparse_equals_dense_when_every_row_is_present():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((4, 2)).astype(np.float32)
    g = rng.standard_normal((4, 2)).astype(np.float32)
    results = []
    for grad in (row_sparse(g, [0, 1, 2, 3], 4), torch.from_numpy(g)):
        opt = lmx.LARS(wd=WD, momentum=MOMENTUM, lazy_update=True)
        w = torch.from_numpy(w0.copy())
        opt.update([0], [w], [grad], [opt.create_state(0, w)])
        results.append(w)
    torch.testing.assert_close(results[0], results[1])


def test_duplicate_rows_are_summed():
    values = np.array([[1.0, 2.0], [0.5, -1.0]], dtype=np.float32)
    duplicated = torch.sparse_coo_tensor(torch.tensor([[2, 2]]), torch.from_numpy(values), (4, 2), check_invariants=True)
    summed = row_sparse(values.sum(axis=0, keepdims=True), [2], 4)
    results = []
    for grad in (duplicated, summed):
        opt = lmx.LARS(wd=WD, lazy_update=True)
        w = torch.ones(4, 2)
        opt.update([0], [w], [grad], [None])
        results.append(w)
    torch.testing.assert_close(results[0], results[1])


def test_sparse_gradient_with_two_sparse_dims_is_an_error():
    grad = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (2, 2), check_invariants=True)
    with pytest.raises(ValueError, match="sparse_dim"):
        lmx.LARS().update([0], [torch.ones(2, 2)], [grad], [None])
