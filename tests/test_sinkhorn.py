import pytest
import torch

from stabletrain.models.residual.sinkhorn import SinkhornKnopp, sinkhorn, sinkhorn_reference


def _logits(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _row_err(m):
    return (m.sum(-1) - 1).abs().max().item()


def _col_err(m):
    return (m.sum(-2) - 1).abs().max().item()


@pytest.mark.parametrize("fn", [sinkhorn, sinkhorn_reference])
def test_doubly_stochastic_20_iters(fn):
    m = fn(_logits(64, 4, 4), iters=20)
    assert m.dtype == torch.float32 and m.shape == (64, 4, 4)
    assert _row_err(m) <= 1e-6
    assert _col_err(m) <= 1e-3
    assert (m >= 0).all()


@pytest.mark.parametrize("iters", [1, 3])
def test_matches_spec_iteration(iters):
    # independent fp64 transcription of the paper: M0 = exp(logits); M <- T_r(T_c(M))
    x = _logits(16, 4, 4, seed=9)
    m = x.double().exp()
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    torch.testing.assert_close(sinkhorn(x, iters=iters), m.float(), atol=1e-6, rtol=0)


def test_n1_is_exactly_one():
    m = sinkhorn(_logits(5, 1, 1) * 10)
    assert torch.equal(m, torch.ones(5, 1, 1))


def test_invariant_to_constant_shift():
    x = _logits(64, 4, 4)
    torch.testing.assert_close(sinkhorn(x + 7.3), sinkhorn(x), atol=1e-6, rtol=0)


def test_large_logits_do_not_overflow():
    # without the max-shift exp(100+) overflows fp32 to inf and the output is NaN;
    # the looser tolerance only absorbs rounding of x + 100 itself (fp32 ulp ~ 8e-6)
    x = _logits(64, 4, 4)
    torch.testing.assert_close(sinkhorn(x + 100.0), sinkhorn(x), atol=1e-5, rtol=0)


def test_converges_with_200_iters():
    m = sinkhorn(_logits(64, 4, 4, seed=1), iters=200)
    assert _row_err(m) <= 1e-5 and _col_err(m) <= 1e-5


def test_spectral_norm_at_most_one():
    m = sinkhorn(_logits(256, 4, 4, seed=2) * 2)
    assert torch.linalg.matrix_norm(m, ord=2).max().item() <= 1 + 1e-3


def test_product_of_projections_stays_stochastic():
    k = 10
    ms = sinkhorn(_logits(k, 32, 4, 4, seed=3))
    delta = _col_err(ms)  # worst single-matrix column error
    prod = ms[0]
    for i in range(1, k):
        prod = prod @ ms[i]
    assert _row_err(prod) <= 1e-5
    assert _col_err(prod) <= k * delta + 1e-6


@pytest.mark.parametrize("iters", [5, 20])
def test_gradcheck(iters):
    x = _logits(2, 3, 3, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SinkhornKnopp.apply(t, iters), (x,))


def test_custom_backward_matches_reference_autograd():
    x = _logits(8, 4, 4, seed=5, dtype=torch.float64)
    w = _logits(8, 4, 4, seed=6, dtype=torch.float64)
    grads = []
    for fn in (sinkhorn, sinkhorn_reference):
        xi = x.clone().requires_grad_()
        out = fn(xi, iters=20)
        grads.append(torch.autograd.grad((out * w).sum(), xi)[0])
    assert grads[0].abs().max() > 1e-3  # non-trivial gradient
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def _graph_nodes(fn_node):
    seen, stack = set(), [fn_node]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(nxt for nxt, _ in n.next_functions)
    return len(seen)


def test_does_not_store_iterates():
    x = _logits(4, 4, 4).requires_grad_()
    out = sinkhorn(x, iters=20)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == x.shape
    assert _graph_nodes(out.grad_fn) <= 2  # the Function node + the leaf accumulator
    assert _graph_nodes(sinkhorn_reference(x, iters=20).grad_fn) > 4 * 20


def test_no_grad_path_builds_no_graph():
    x = _logits(4, 4, 4)
    assert sinkhorn(x).grad_fn is None
    with torch.no_grad():
        assert sinkhorn(x.requires_grad_()).grad_fn is None


def test_4d_input_matches_per_matrix():
    x = _logits(2, 5, 4, 4, seed=7).requires_grad_()
    out = sinkhorn(x)
    assert out.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out.reshape(10, 4, 4), sinkhorn(x.detach().reshape(10, 4, 4)), atol=0, rtol=0)
    assert _row_err(out) <= 1e-6
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_bf16_input_upcasts():
    x = _logits(3, 4, 4, 4, seed=8).to(torch.bfloat16).requires_grad_()
    out = sinkhorn(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_reference(x.detach().float()), atol=0, rtol=0)
    assert _row_err(out) <= 1e-6
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
