"""Triton kernels of the mHC stream (model.residual.kernel=triton; docs/residual-streams.md, docs/methods.md §2).

Streams are [M, n, C] (M tokens), sublayer outputs [M, C], coefficients fp32 ([M, n] post, [M, n, n] res). A
program owns BM tokens and walks their n*C values in chunks of BC channels, all n streams at once ([BM, NP, BC]).
The n^2+2n logits are two padded groups, H_res (NP*NP, row-major) and [pre (NP) | post (NP) | unused] (PPW), each
one tl.dot accumulator of the projection; phi, bias and alpha are gathered into those columns in the kernel.

- `_fwd_kernel`: optionally the pending write x_s = H_res x + H_post y (stored: the next write reads it), then the
  read of x_s: RMS and projection in one pass, sigmoid and Sinkhorn in registers, h = H_pre x_s in a second pass
  over the program's own tile (hot in L2).
- `_bwd_coef_kernel`: recomputes x_s, RMS and projection, the gradient of the logits through sigmoid and
  Sinkhorn (the iterations recomputed into a per-token scratch, never kept from the forward).
- `_bwd_stream_kernel`: the stream gradient of the read (H_pre, RMS and projection terms) and of the write.
Kernels are decorated on first use (`load`): TRITON_INTERPRET is read then, not at import (tests set it late).
The four kernel signatures keep `# fmt: skip`: one argument per line would make each kernel twice as long.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError as e:  # optional: only kernel=triton needs it
    if e.name != "triton":
        raise
    triton = tl = None


def _cols(n, NP: tl.constexpr, PW: tl.constexpr, RES: tl.constexpr):
    """The columns of one group of logits: RES, H_res in NP*NP (row-major, i, j < n); else [pre | post | unused] in
    PW, NP each. Per column: its column in phi/bias (0 where none), whether it exists, its alpha (0 pre, 1 post,
    2 res)."""
    if RES:  # one return below: Triton wants the same return types on every path, even under a constexpr branch
        p = tl.arange(0, NP * NP)
        valid = (p // NP < n) & (p % NP < n)
        src, group = 2 * n + (p // NP) * n + p % NP, tl.full([NP * NP], 2, tl.int32)
    else:
        q = tl.arange(0, PW)
        valid = (q < 2 * NP) & (q % NP < n)
        src, group = tl.where(q < NP, q % NP, n + q % NP), tl.where(q < NP, 0, 1)
    return tl.where(valid, src, 0), valid, group


def _take(z, first, W: tl.constexpr, PW: tl.constexpr):
    """Columns first..first+W-1 of z [BM, PW] as [BM, W] (a masked sum: Triton has no slicing)."""
    sel = tl.arange(0, PW)[:, None] == first + tl.arange(0, W)[None, :]
    return tl.sum(tl.where(sel[None, :, :], z[:, :, None], 0.0), axis=1)


def _put(v, first, W: tl.constexpr, PW: tl.constexpr):
    """[BM, W] into columns first..first+W-1 of a zero [BM, PW]."""
    sel = tl.arange(0, W)[:, None] + first == tl.arange(0, PW)[None, :]
    return tl.sum(tl.where(sel[None, :, :], v[:, :, None], 0.0), axis=1)


def _tile(rows, c0, n, C: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, M):
    """Offsets and mask of a [BM, NP, BC] stream tile (streams i < n, channels c0.. < C)."""
    i = tl.arange(0, NP)
    c = c0 + tl.arange(0, BC)
    offs = rows[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
    mask = (rows[:, None, None] < M) & (i[None, :, None] < n) & (c[None, None, :] < C)
    return offs, mask, rows[:, None] * C + c[None, :], (rows[:, None] < M) & (c[None, :] < C)


def _mix(x, y, pw, rw, n: tl.constexpr, NP: tl.constexpr):
    """The write on a tile: sum_j rw[:, i, j] x[:, j] + pw[:, i] y (x [BM, NP, BC], y [BM, BC], fp32)."""
    i = tl.arange(0, NP)
    out = tl.zeros_like(x)
    for j in tl.static_range(n):
        xj = tl.sum(tl.where(i[None, :, None] == j, x, 0.0), axis=1)
        rj = tl.sum(tl.where(i[None, None, :] == j, rw, 0.0), axis=2)
        out += rj[:, :, None] * xj[:, None, :]
    return out + pw[:, :, None] * y[:, None, :]


def _load_coef(PW, RW, rows, M, n, NP: tl.constexpr):
    """[BM, NP] and [BM, NP, NP] fp32 coefficients, zero outside i, j < n."""
    i = tl.arange(0, NP)
    mv = (rows[:, None] < M) & (i[None, :] < n)
    pw = tl.load(PW + rows[:, None] * n + i[None, :], mask=mv, other=0.0)
    rmask = mv[:, :, None] & (i[None, None, :] < n)
    rw = tl.load(RW + rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :], mask=rmask, other=0.0)
    return pw, rw


def _phi_tile(PHI, c0, n, C: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, W: tl.constexpr, src, valid, K):
    """phi at the tile's (stream, channel) rows and a group's columns, [NP * BC, W] fp32."""
    i = tl.arange(0, NP)
    c = c0 + tl.arange(0, BC)
    r = (i[:, None] * C + c[None, :])[:, :, None]
    mask = (i[:, None, None] < n) & (c[None, :, None] < C) & valid[None, None, :]
    w = tl.load(PHI + r * K + src[None, None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.reshape(w, [NP * BC, W])


def _stats(X, Y, PW, RW, XS, DH, PHI, rows, M, n, C: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
           PPW: tl.constexpr, BM: tl.constexpr, WRITE: tl.constexpr, PROJECT: tl.constexpr, DOT_H: tl.constexpr,
           PREC: tl.constexpr):  # fmt: skip
    """The pending write (stored to XS), then one pass over the stream: the sum of squares, the projections onto
    phi's H_res and pre/post columns and (DOT_H) <x_s[i], dh> per stream. The write has its own loop: fused into
    the projection's, the registers they hold together made the kernel 3.5x slower on an H200."""
    if WRITE:
        pw, rw = _load_coef(PW, RW, rows, M, n, NP)
        for c0 in range(0, C, BC):
            offs, mask, offs_y, mask_y = _tile(rows, c0, n, C, NP, BC, M)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            x = _mix(x, tl.load(Y + offs_y, mask=mask_y, other=0.0).to(tl.float32), pw, rw, n, NP)
            tl.store(XS + offs, x.to(XS.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the pass below reads back this program's own stores
        X = XS
    src_r, valid_r, _ = _cols(n, NP, PPW, True)
    src_p, valid_p, _ = _cols(n, NP, PPW, False)
    sumsq = tl.zeros([BM], dtype=tl.float32)
    acc_r = tl.zeros([BM, NP * NP], dtype=tl.float32)
    acc_p = tl.zeros([BM, PPW], dtype=tl.float32)
    dpre = tl.zeros([BM, NP], dtype=tl.float32)
    if PROJECT:
        for c0 in range(0, C, BC):
            offs, mask, offs_y, mask_y = _tile(rows, c0, n, C, NP, BC, M)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            sumsq += tl.sum(tl.sum(x * x, axis=2), axis=1)
            x2, K = tl.reshape(x, [BM, NP * BC]), n * n + 2 * n
            acc_r += tl.dot(x2, _phi_tile(PHI, c0, n, C, NP, BC, NP * NP, src_r, valid_r, K), input_precision=PREC)
            acc_p += tl.dot(x2, _phi_tile(PHI, c0, n, C, NP, BC, PPW, src_p, valid_p, K), input_precision=PREC)
            if DOT_H:
                dh = tl.load(DH + offs_y, mask=mask_y, other=0.0).to(tl.float32)
                dpre += tl.sum(x * dh[:, None, :], axis=2)
    return sumsq, acc_r, acc_p, dpre


def _div(a, b):
    """a / b rounded as IEEE division (as the reference divides; Triton's `/` is approximate), b broadcast."""
    return tl.div_rn(a, b + tl.zeros_like(a))


def _logits(acc, rms, BIAS, ALPHA, n, NP: tl.constexpr, PPW: tl.constexpr, RES: tl.constexpr):
    """z = (x phi) / rms * alpha + b for one group (the reference's order of operations); also (x phi) / rms, alpha."""
    src, valid, group = _cols(n, NP, PPW, RES)
    alpha = tl.load(ALPHA + group).to(tl.float32)
    bias = tl.load(BIAS + src, mask=valid, other=0.0).to(tl.float32)
    u = _div(acc, rms[:, None])
    return u * alpha[None, :] + bias[None, :], u, alpha


def _sinkhorn(z, scratch, n, NP: tl.constexpr, ITERS: tl.constexpr, STORE: tl.constexpr):
    """exp(z - max) then ITERS x (columns, rows) normalisation on [BM, NP, NP]; STORE keeps each half-step's input
    at scratch + s * NP * NP (s = 0 .. 2 ITERS - 1) for the backward."""
    i = tl.arange(0, NP)
    valid = (i[:, None] < n) & (i[None, :] < n)
    z = tl.where(valid[None, :, :], z, float("-inf"))
    zmax = tl.max(tl.max(z, axis=2), axis=1)
    m = tl.where(valid[None, :, :], tl.exp(z - zmax[:, None, None]), 0.0)
    for t in range(ITERS):
        if STORE:
            tl.store(scratch + (2 * t) * NP * NP, m)
        m = _div(m, tl.where(i < n, tl.sum(m, axis=1), 1.0)[:, None, :])
        if STORE:
            tl.store(scratch + (2 * t + 1) * NP * NP, m)
        m = _div(m, tl.where(i < n, tl.sum(m, axis=2), 1.0)[:, :, None])
    return m


def _sinkhorn_bwd(g, scratch, n, NP: tl.constexpr, ITERS: tl.constexpr):
    """Gradient w.r.t. z of `_sinkhorn` from the stored half-step inputs; out = a / s gives da = (g - sum(g out)) / s.
    The max shift has zero gradient (the output does not depend on it), as in the reference."""
    i = tl.arange(0, NP)
    for tt in range(ITERS):
        t = ITERS - 1 - tt
        a = tl.load(scratch + (2 * t + 1) * NP * NP)
        s = tl.where(i < n, tl.sum(a, axis=2), 1.0)[:, :, None]
        g = _div(g - tl.sum(g * _div(a, s), axis=2)[:, :, None], s)
        a = tl.load(scratch + (2 * t) * NP * NP)
        s = tl.where(i < n, tl.sum(a, axis=1), 1.0)[:, None, :]
        g = _div(g - tl.sum(g * _div(a, s), axis=1)[:, None, :], s)
    return g * tl.load(scratch)  # d exp(z) = exp(z) dz


def _fwd_kernel(X, Y, PW, RW, XS, PHI, BIAS, ALPHA, H, POST, RES, SCR, M, eps, n: tl.constexpr, C: tl.constexpr,
                NP: tl.constexpr, BC: tl.constexpr, PPW: tl.constexpr, BM: tl.constexpr, ITERS: tl.constexpr,
                WRITE: tl.constexpr, READ: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    sumsq, acc_r, acc_p, _ = _stats(X, Y, PW, RW, XS, H, PHI, rows, M, n, C, NP, BC, PPW, BM, WRITE, READ, False, PREC)
    if READ:
        rms = tl.sqrt_rn(sumsq / (n * C) + eps)
        zr, _, _ = _logits(acc_r, rms, BIAS, ALPHA, n, NP, PPW, True)
        zp, _, _ = _logits(acc_p, rms, BIAS, ALPHA, n, NP, PPW, False)
        pre = tl.sigmoid(_take(zp, 0, NP, PPW))
        post = 2 * tl.sigmoid(_take(zp, NP, NP, PPW))
        res = _sinkhorn(tl.reshape(zr, [BM, NP, NP]), SCR, n, NP, ITERS, False)
        i = tl.arange(0, NP)
        mv = (rows[:, None] < M) & (i[None, :] < n)
        tl.store(POST + rows[:, None] * n + i[None, :], post, mask=mv)
        rmask = mv[:, :, None] & (i[None, None, :] < n)
        tl.store(RES + rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :], res, mask=rmask)
        if WRITE:
            X = XS
        for c0 in range(0, C, BC):  # h = H_pre x_s
            offs, mask, offs_y, mask_y = _tile(rows, c0, n, C, NP, BC, M)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(H + offs_y, tl.sum(pre[:, :, None] * x, axis=1).to(H.dtype.element_ty), mask=mask_y)


def _store_cols(DZ, DZU, DMIX, rows, M, K, RES: tl.constexpr, n, NP: tl.constexpr, PPW: tl.constexpr, dz, u, du, rms):
    """One group's dz, dz*u and dmix = du / rms into [M, K] (phi's column order)."""
    src, valid, _ = _cols(n, NP, PPW, RES)
    offs = rows[:, None] * K + src[None, :]
    mask = (rows[:, None] < M) & valid[None, :]
    tl.store(DZ + offs, dz, mask=mask)
    tl.store(DZU + offs, dz * u, mask=mask)
    tl.store(DMIX + offs, du / rms[:, None], mask=mask)


def _bwd_coef_kernel(X, Y, PW, RW, XS, DH, DPOST, DRES, PHI, BIAS, ALPHA, SCR, DZ, DZU, DMIX, A, PRE, M, eps,
                     n: tl.constexpr, C: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, PPW: tl.constexpr,
                     BM: tl.constexpr, ITERS: tl.constexpr, WRITE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Per token: dz (logits), dz*u (for alpha), dmix = dz alpha / rms (for phi and the stream), a = drms/(N rms)
    (the RMS term of the stream gradient is a * x_s) and H_pre."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    stats = _stats(X, Y, PW, RW, XS, DH, PHI, rows, M, n, C, NP, BC, PPW, BM, WRITE, True, True, PREC)
    sumsq, acc_r, acc_p, dpre = stats
    rms = tl.sqrt_rn(sumsq / (n * C) + eps)
    zr, ur, alpha_r = _logits(acc_r, rms, BIAS, ALPHA, n, NP, PPW, True)
    zp, up, alpha_p = _logits(acc_p, rms, BIAS, ALPHA, n, NP, PPW, False)
    pre = tl.sigmoid(_take(zp, 0, NP, PPW))
    sp = tl.sigmoid(_take(zp, NP, NP, PPW))
    i = tl.arange(0, NP)
    mv = (rows[:, None] < M) & (i[None, :] < n)
    dpost = tl.load(DPOST + rows[:, None] * n + i[None, :], mask=mv, other=0.0)
    rmask = mv[:, :, None] & (i[None, None, :] < n)
    offs_r = rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    scratch = SCR + rows[:, None, None] * (2 * ITERS * NP * NP) + i[None, :, None] * NP + i[None, None, :]
    _sinkhorn(tl.reshape(zr, [BM, NP, NP]), scratch, n, NP, ITERS, True)
    tl.debug_barrier()  # the backward reads back this program's scratch
    dzr = tl.reshape(_sinkhorn_bwd(tl.load(DRES + offs_r, mask=rmask, other=0.0), scratch, n, NP, ITERS), [BM, NP * NP])
    dzp = _put(dpre * pre * (1 - pre), 0, NP, PPW) + _put(dpost * 2 * sp * (1 - sp), NP, NP, PPW)
    dur, dup = dzr * alpha_r[None, :], dzp * alpha_p[None, :]
    drms = -(tl.sum(dur * ur, axis=1) + tl.sum(dup * up, axis=1)) / rms
    K = n * n + 2 * n
    _store_cols(DZ, DZU, DMIX, rows, M, K, True, n, NP, PPW, dzr, ur, dur, rms)
    _store_cols(DZ, DZU, DMIX, rows, M, K, False, n, NP, PPW, dzp, up, dup, rms)
    tl.store(A + rows, drms / (n * C * rms), mask=rows < M)
    tl.store(PRE + rows[:, None] * n + i[None, :], pre, mask=mv)


def _load_cols(DMIX, rows, M, K, RES: tl.constexpr, n, NP: tl.constexpr, PPW: tl.constexpr):
    src, valid, _ = _cols(n, NP, PPW, RES)  # one group of [M, K] in its padded columns
    return tl.load(DMIX + rows[:, None] * K + src[None, :], mask=(rows[:, None] < M) & valid[None, :], other=0.0)


def _bwd_stream_kernel(X, Y, PW, RW, XS, DXS, DH, PRE, A, DMIX, PHI, DX, DY, DPW, DRW, M, n: tl.constexpr,
                       C: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr, PPW: tl.constexpr, BM: tl.constexpr,
                       WRITE: tl.constexpr, READ: tl.constexpr, HAS_DXS: tl.constexpr,
                       PREC: tl.constexpr):  # fmt: skip
    """g = dL/dx_s = DXS + H_pre dh + a x_s + dmix phi^T (the read), then through the write: DX = H_res^T g,
    DY = H_post^T g, DPW = <g_i, y>, DRW = <g_i, x_j>. Without WRITE, DX = g."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    i = tl.arange(0, NP)
    K = n * n + 2 * n
    if READ:
        pre = tl.load(PRE + rows[:, None] * n + i[None, :], mask=(rows[:, None] < M) & (i[None, :] < n), other=0.0)
        a = tl.load(A + rows, mask=rows < M, other=0.0)
        dmix_r, dmix_p = _load_cols(DMIX, rows, M, K, True, n, NP, PPW), _load_cols(DMIX, rows, M, K, False, n, NP, PPW)
        src_r, valid_r, _ = _cols(n, NP, PPW, True)
        src_p, valid_p, _ = _cols(n, NP, PPW, False)
    if WRITE:
        pw, rw = _load_coef(PW, RW, rows, M, n, NP)
        dpw = tl.zeros([BM, NP], dtype=tl.float32)
        drw = tl.zeros([BM, NP, NP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs, mask, offs_y, mask_y = _tile(rows, c0, n, C, NP, BC, M)
        g = tl.zeros([BM, NP, BC], dtype=tl.float32)
        if HAS_DXS:
            g += tl.load(DXS + offs, mask=mask, other=0.0).to(tl.float32)
        if READ:
            xs = tl.load(XS + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(DH + offs_y, mask=mask_y, other=0.0).to(tl.float32)
            phi_r = tl.trans(_phi_tile(PHI, c0, n, C, NP, BC, NP * NP, src_r, valid_r, K))
            proj = tl.dot(dmix_r, phi_r, input_precision=PREC)
            phi_p = tl.trans(_phi_tile(PHI, c0, n, C, NP, BC, PPW, src_p, valid_p, K))
            proj += tl.dot(dmix_p, phi_p, input_precision=PREC)
            g += pre[:, :, None] * dh[:, None, :] + a[:, None, None] * xs + tl.reshape(proj, [BM, NP, BC])
        if WRITE:
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + offs_y, mask=mask_y, other=0.0).to(tl.float32)
            tl.store(DY + offs_y, tl.sum(pw[:, :, None] * g, axis=1).to(DY.dtype.element_ty), mask=mask_y)
            dpw += tl.sum(g * y[:, None, :], axis=2)
            for j in tl.static_range(n):
                rj = tl.sum(tl.where(i[None, None, :] == j, rw, 0.0), axis=2)
                dxj = tl.sum(rj[:, :, None] * g, axis=1)
                tl.store(DX + offs_y + (rows[:, None] * (n - 1) + j) * C, dxj.to(DX.dtype.element_ty), mask=mask_y)
                xj = tl.sum(tl.where(i[None, :, None] == j, x, 0.0), axis=1)
                drw += tl.where(i[None, None, :] == j, tl.sum(g * xj[:, None, :], axis=2)[:, :, None], 0.0)
        else:
            tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=mask)
    if WRITE:
        mv = (rows[:, None] < M) & (i[None, :] < n)
        tl.store(DPW + rows[:, None] * n + i[None, :], dpw, mask=mv)
        offs_r = rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
        tl.store(DRW + offs_r, drw, mask=mv[:, :, None] & (i[None, None, :] < n))


# every function above, decorated by load()
_JIT = [k for k, v in dict(globals()).items() if k.startswith("_") and getattr(v, "__module__", "") == __name__]


@functools.cache
def load() -> bool:
    """Decorate the kernels, once per process; True when they run under the interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("model.residual.kernel=triton needs the triton package (pip install 'triton>=3.6')")
    for name in _JIT:
        globals()[name] = triton.jit(globals()[name])
    return bool(triton.knobs.runtime.interpret)


def check(x: torch.Tensor) -> None:
    """Compiled kernels run on CUDA tensors; CPU tensors need the interpreter (a test tool: slow)."""
    interpret = load()
    if x.is_cuda == interpret:
        where = "CUDA tensors with TRITON_INTERPRET=1" if x.is_cuda else "CPU tensors need TRITON_INTERPRET=1"
        raise RuntimeError(f"model.residual.kernel=triton: {where} (set before the first kernel=triton forward)")


class Shape(NamedTuple):
    """Sizes and tiles of one launch: M tokens, n streams (NP padded, >= 4 so that H_res fills a 16-wide dot), C
    channels, PPW pre/post columns; BM tokens and BC channels a tile."""

    M: int
    n: int
    C: int
    NP: int
    PPW: int
    BM: int
    BC: int
    warps: int = 4
    precision: str = "tf32x3"  # of the projections' tl.dot: tensor cores at about fp32 accuracy ("ieee": exact fp32)

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.M, self.BM),)


def shape(x: torch.Tensor) -> Shape:
    M, n, C = x.shape
    NP = max(4, triton.next_power_of_2(n))
    PPW = max(16, 2 * NP)
    interpret = load()  # the interpreter runs one numpy op per tile op: fewer, larger tiles; GPU: fastest on an H200
    BM = min(1024, max(16, triton.next_power_of_2(M))) if interpret else 64
    return Shape(M, n, C, NP, PPW, BM, min(256, triton.next_power_of_2(C)) if interpret else max(16, 128 // NP))


def forward(x, y, pw, rw, phi, bias, alpha, eps: float, iters: int, read: bool):
    """(x_s or None, h, post, res); x_s = the write of (x, y, pw, rw) when y is given, else x is read as it is."""
    s, write = shape(x), y is not None
    xs = torch.empty_like(x) if write else None
    h = x.new_empty(s.M, s.C) if read else None
    post = x.new_empty(s.M, s.n, dtype=torch.float32) if read else None
    res = x.new_empty(s.M, s.n, s.n, dtype=torch.float32) if read else None
    ptrs = [t if t is not None else x for t in (y, pw, rw, xs, phi, bias, alpha, h, post, res)]  # x: unused ones
    _fwd_kernel[s.grid](
        x, *ptrs, x, s.M, eps, s.n, s.C, s.NP, s.BC, s.PPW, s.BM, iters, write, read, s.precision, num_warps=s.warps
    )
    return xs, h, post, res


def backward_coef(x, y, pw, rw, dh, dpost, dres, phi, bias, alpha, eps: float, iters: int):
    """(x_s, dz, dz*u, dmix (each [M, K], phi's column order), a [M], H_pre [M, n]) for the read of x_s (see the
    kernel)."""
    s, write = shape(x), y is not None
    f32 = dict(device=x.device, dtype=torch.float32)
    xs = torch.empty_like(x) if write else x
    dz, dzu, dmix = (torch.empty(s.M, s.n * s.n + 2 * s.n, **f32) for _ in range(3))
    a, pre = torch.empty(s.M, **f32), torch.empty(s.M, s.n, **f32)
    scratch = torch.empty(s.grid[0] * s.BM, 2 * iters, s.NP, s.NP, **f32)  # the Sinkhorn half-steps, transient
    ins = (x, y if write else x, pw if write else dz, rw if write else dz, xs, dh, dpost, dres, phi, bias, alpha)
    outs = (scratch, dz, dzu, dmix, a, pre)
    _bwd_coef_kernel[s.grid](
        *ins, *outs, s.M, eps, s.n, s.C, s.NP, s.BC, s.PPW, s.BM, iters, write, s.precision, num_warps=s.warps
    )
    return xs, dz, dzu, dmix, a, pre


def backward_stream(x, y, pw, rw, xs, dxs, dh, pre, a, dmix, phi):
    """(dx, dy, dpw, drw): the gradient through the read of x_s (dh given) and the write of (x, y, pw, rw) (y given);
    dxs is the gradient x_s receives downstream (or None)."""
    s, write, read = shape(x), y is not None, dh is not None
    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if write else None
    dpw = x.new_empty(s.M, s.n, dtype=torch.float32) if write else None
    drw = x.new_empty(s.M, s.n, s.n, dtype=torch.float32) if write else None
    ptrs = [t if t is not None else x for t in (y, pw, rw, xs, dxs, dh, pre, a, dmix, phi, dx, dy, dpw, drw)]
    _bwd_stream_kernel[s.grid](
        x, *ptrs, s.M, s.n, s.C, s.NP, s.BC, s.PPW, s.BM, write, read, dxs is not None, s.precision, num_warps=s.warps
    )
    return dx, dy, dpw, drw
