"""Sinkhorn-Knopp projection onto (approximately) doubly stochastic matrices.

mHC (arXiv 2512.24880) builds the residual-mixing matrix as
H_res = Sinkhorn-Knopp(exp(logits)): M0 = exp(logits), then ``iters`` rounds of
M <- T_r(T_c(M)) (column-normalise, then row-normalise). Row normalisation runs
last, so rows sum to 1 exactly (up to rounding) and columns only approximately.
Everything acts on the last two dims of a ``[..., n, n]`` tensor.
"""

import torch
from torch.autograd.function import once_differentiable

__all__ = ["sinkhorn", "sinkhorn_reference", "SinkhornKnopp"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Upcast half/bf16 to fp32 (the iterations are division-heavy and converge
    # poorly in 8-bit mantissas); fp64 stays fp64 so gradcheck is meaningful.
    return torch.promote_types(dtype, torch.float32)


def sinkhorn_reference(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Unrolled Sinkhorn-Knopp; autograd stores every iterate. Returns fp32 (fp64 for fp64 input)."""
    x = logits.to(_compute_dtype(logits.dtype))
    # Shift by the per-matrix max: exp cannot overflow, and every matrix keeps an
    # entry equal to 1, so no row/column sum can underflow to 0 unless the logit
    # spread exceeds ~87 (fp32). That is why no epsilon is added to the sums.
    # The output is invariant to this shift, so the max is detached: its true
    # gradient contribution is exactly zero and routing it through amax only
    # adds rounding noise.
    x = x - x.amax(dim=(-2, -1), keepdim=True).detach()
    m = x.exp()
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # T_c: columns sum to 1
        m = m / m.sum(dim=-1, keepdim=True)  # T_r: rows sum to 1 (last, so exact)
    return m


class SinkhornKnopp(torch.autograd.Function):
    """Memory-lean Sinkhorn-Knopp: saves only the input logits and recomputes the
    iterations in backward, so activation memory is O(input), not O(iters * input)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        with torch.no_grad():  # already the case inside Function.forward; explicit for clarity
            return sinkhorn_reference(logits, iters)

    @staticmethod
    @once_differentiable  # backward recomputes without create_graph: no double-backward
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_(True)
            out = sinkhorn_reference(x, ctx.iters)
            (grad,) = torch.autograd.grad(out, x, grad_output)
        return grad, None


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project ``exp(logits)`` ([..., n, n]) towards the doubly stochastic set.

    Output is fp32 (fp64 for fp64 input); the caller casts. Uses the recomputing
    autograd Function when a gradient is needed, otherwise a plain no-grad pass.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return SinkhornKnopp.apply(logits, iters)
    with torch.no_grad():
        return sinkhorn_reference(logits, iters)
