"""kernel=triton: autograd around the kernels of mhc_triton.py, with the pending-write fusion of kernel=fused and the
mHC paper's stream recomputation (docs/residual-streams.md).

Saved for backward, per block: the stream at the block boundary (the checkpoint), each sublayer output y and its
(post, res) coefficients, all of which a write needs anyway. The stream states inside the block are recomputed in
backward from the checkpoint (the paper keeps the stream every L_r blocks; here L_r = 1), the RMS and projection
from the recomputed stream, and the Sinkhorn iterations inside the coefficient backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from stabletrain.models.residual import mhc_triton as kernels


class Pending(NamedTuple):
    """The stream after a sublayer, not yet written: x' = res x + post y, with x = the writes in `chain` (each
    (y, post, res)) applied to `ckpt`, the stream at the block boundary. The next read computes x' in its pass;
    `materialize` writes it out."""

    x: torch.Tensor
    y: torch.Tensor
    post: torch.Tensor
    res: torch.Tensor
    ckpt: torch.Tensor
    chain: tuple = ()


def _replay(ckpt: torch.Tensor, chain) -> torch.Tensor:
    """The stream `chain` (flat y, post, res triples) leads to from ckpt, recomputed in backward."""
    x = ckpt
    for k in range(0, len(chain), 3):
        x = kernels.forward(x, *chain[k : k + 3], None, None, None, 0.0, 0, read=False)[0]
    return x


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


class _Read(torch.autograd.Function):
    """(x_s, h, post, res) of the read of x_s = res_w x + post_w y; without y, (h, post, res) of the read of x.
    ckpt and chain only say how to recompute x in backward (no gradient flows to them)."""

    @staticmethod
    def forward(ctx, x, y, pw, rw, phi, bias, alpha, eps: float, iters: int, ckpt, *chain):
        xs, h, post, res = kernels.forward(x, y, pw, rw, phi, bias, alpha, eps, iters, read=True)
        ctx.eps, ctx.iters, ctx.write, ctx.chain = eps, iters, y is not None, len(chain)
        ctx.save_for_backward(ckpt, y, pw, rw, phi, bias, alpha, *chain)
        return (xs, h, post, res) if y is not None else (h, post, res)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        ckpt, y, pw, rw, phi, bias, alpha, *chain = ctx.saved_tensors
        dxs, dh, dpost, dres = (_contiguous(g) for g in (grads if ctx.write else (None, *grads)))
        x = _replay(ckpt, chain)
        dh = torch.zeros(x.shape[0], x.shape[2], device=x.device, dtype=x.dtype) if dh is None else dh
        n = x.shape[1]
        dpost = x.new_zeros(x.shape[0], n, dtype=torch.float32) if dpost is None else dpost
        dres = x.new_zeros(x.shape[0], n, n, dtype=torch.float32) if dres is None else dres
        xs, dz, dzu, dmix, a, pre = kernels.backward_coef(
            x, y, pw, rw, dh, dpost, dres, phi, bias, alpha, ctx.eps, ctx.iters
        )
        dphi = xs.flatten(1).float().t() @ dmix
        dalpha = torch.stack([dzu[:, :n].sum(), dzu[:, n : 2 * n].sum(), dzu[:, 2 * n :].sum()])
        dx, dy, dpw, drw = kernels.backward_stream(x, y, pw, rw, xs, dxs, dh, pre, a, dmix, phi)
        params = (dphi.to(phi.dtype), dz.sum(0).to(bias.dtype), dalpha.to(alpha.dtype))
        return dx, dy, dpw, drw, *params, None, None, None, *(None,) * ctx.chain


class _Write(torch.autograd.Function):
    """x_s = res_w x + post_w y (a pending write written out); x recomputed from ckpt and chain in backward."""

    @staticmethod
    def forward(ctx, x, y, pw, rw, ckpt, *chain):
        ctx.chain = len(chain)
        ctx.save_for_backward(ckpt, y, pw, rw, *chain)
        return kernels.forward(x, y, pw, rw, None, None, None, 0.0, 0, read=False)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, dxs):
        ckpt, y, pw, rw, *chain = ctx.saved_tensors
        x = _replay(ckpt, chain)
        dx, dy, dpw, drw = kernels.backward_stream(x, y, pw, rw, None, dxs.contiguous(), None, None, None, None, None)
        return dx, dy, dpw, drw, None, *(None,) * ctx.chain


def _flat(x: torch.Tensor, y, post, res, ckpt, chain) -> list:
    """[M, n, C] streams, [M, C] outputs, [M, n] and [M, n, n] coefficients (views of contiguous tensors)."""
    n, C = x.shape[-2:]

    def f(t, *tail):
        return None if t is None else t.reshape(-1, *tail).contiguous()

    triples = [(f(t, C), f(p, n), f(r, n, n)) for t, p, r in chain]
    return [f(x, n, C), f(y, C), f(post, n), f(res, n, n), f(ckpt, n, C), *(t for tr in triples for t in tr)]


def read(x: torch.Tensor, y, post, res, conn, ckpt, chain=()):
    """The read of x (y None) or of the write of (x, y, post, res): (x_s, h, post', res') shaped like x."""
    kernels.check(x)
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    x_, y_, p_, r_, ckpt_, *chain_ = _flat(x, y, post, res, ckpt, chain)
    out = _Read.apply(x_, y_, p_, r_, conn.phi, conn.bias, conn.alpha, conn.eps, conn.iters, ckpt_, *chain_)
    xs, h, post, res = out if y is not None else (x, *out)
    return xs.view(*lead, n, C), h.view(*lead, C), post.view(*lead, n), res.view(*lead, n, n)


def write(x: torch.Tensor, y, post, res, ckpt=None, chain=()) -> torch.Tensor:
    kernels.check(x)
    args = _flat(x, y, post, res, x if ckpt is None else ckpt, chain)
    return _Write.apply(*args).view(x.shape)


def block(x, sublayers) -> Pending:
    """Each sublayer's write stays pending and is computed in the next read's pass; the first read of the block
    writes out the block-boundary stream, which becomes the checkpoint the rest of the block recomputes from."""
    for k, s in enumerate(sublayers):
        c = s.connection
        if isinstance(x, Pending):
            xs, h, post, res = read(x.x, x.y, x.post, x.res, c, x.ckpt, x.chain)
            ckpt, chain = (xs, ()) if k == 0 else (x.ckpt, (*x.chain, (x.y, x.post, x.res)))
        else:
            xs, h, post, res = read(x, None, None, None, c, x)
            ckpt, chain = x, ()
        c.observe(res)
        x = Pending(xs, c.sublayer(h, s.norm, s.fn), post, res, ckpt, chain)
    return x


def materialize(x):
    return write(x.x, x.y, x.post, x.res, x.ckpt, x.chain) if isinstance(x, Pending) else x
