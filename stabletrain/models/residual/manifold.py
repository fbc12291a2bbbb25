"""Manifold-constrained Hyper-Connections, mHC (Xie et al., arXiv 2512.24880), docs/methods.md §2.

x[B,T,n,C]. Per sublayer, coefficients come from the flattened n*C vector of each token, in fp32, in the fused
form: one matmul to n^2+2n outputs laid out [pre | post | res (row-major)], then the RMS division, then
alpha and the bias:  logits = alpha * (x phi) / rms(x) + b.
    H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn-Knopp(exp(.))   (rows sum to 1 exactly)
    x' = H_res x + H_post^T F(H_pre x)
With identical streams and rows summing to 1, H_res keeps the streams identical: the paper's convention.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from stabletrain.config import ResidualConfig
from stabletrain.config.fields import Choice, at_least, finite, positive
from stabletrain.models.init import reset_own_parameters
from stabletrain.models.residual import mhc_triton_autograd as triton_stream
from stabletrain.models.residual.base import RESIDUAL_STREAMS, Connection, PropagationScalar, ResidualStream
from stabletrain.models.residual.sinkhorn import sinkhorn, sinkhorn_reference


class MHCInit(Choice):
    hc = "hc"  # b_res = tau*I, soft one-hot b_pre (HC-faithful)
    megatron = "megatron"  # all biases 0


class PhiInit(Choice):
    normal = "normal"
    xavier = "xavier"


class Collapse(Choice):
    sum = "sum"
    head = "head"  # learned pre-only head


class Kernel(Choice):
    eager = "eager"  # the PyTorch reference
    fused = "fused"  # torch.compile'd stream passes (C++ on CPU, Triton on GPU)
    triton = "triton"  # hand-written Triton kernels, stream recomputed in backward (CUDA; CPU: TRITON_INTERPRET=1)


@dataclass
class MHCConfig(ResidualConfig):
    """Manifold-constrained Hyper-Connections (model/residual=mhc); the paper's Table 5 where it has a value."""

    kind: str = "mhc"
    streams: int = at_least(1, 4)  # expansion rate n
    gate_init: float = at_least(0, 0.01)  # alpha_pre/post/res at init
    sinkhorn_iters: int = at_least(1, 20)  # Sinkhorn-Knopp rounds for H_res (paper: 20)
    init: MHCInit = MHCInit.hc  # bias init (the paper gives only alpha)
    phi_init: PhiInit = PhiInit.normal  # normal (std phi_std) | xavier
    phi_std: float = at_least(0, 0.02)  # std of phi with phi_init=normal
    res_logit: float = finite(4.0)  # init=hc: tau on the diagonal of b_res
    pre_logit: float = finite(4.0)  # init=hc: +/- this on b_pre (soft one-hot on stream k mod n)
    norm_eps: float = positive(1e-20)  # eps of the RMS over the flattened n*C vector (paper: 1e-20)
    collapse: Collapse = Collapse.sum  # output collapse: sum of the streams | head (learned pre-only head)
    kernel: Kernel = Kernel.eager


def _init_phi(phi: torch.Tensor, cfg: MHCConfig, generator: torch.Generator | None = None) -> None:
    if cfg.phi_init == "xavier":
        nn.init.xavier_uniform_(phi, generator=generator)
    else:
        nn.init.normal_(phi, std=cfg.phi_std, generator=generator)


def mhc_logits(
    x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, n: int, eps: float, fused: bool = True
) -> torch.Tensor:
    """[.., n^2+2n] pre-activation coefficients; fused divides by the RMS after the matmul (same value)."""
    xf = x.flatten(-2).float()
    rms = torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    a = alpha.float()
    scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    mix = (xf @ phi.float()) / rms if fused else (xf / rms) @ phi.float()
    return mix * scale + bias.float()


def mhc_coefficients(x, phi, bias, alpha, n: int, eps: float, iters: int, project=sinkhorn):
    """(H_pre [..,n] in (0,1), H_post [..,n] in (0,2), H_res [..,n,n] doubly stochastic), fp32."""
    z = mhc_logits(x, phi, bias, alpha, n, eps)
    pre = torch.sigmoid(z[..., :n])
    post = 2 * torch.sigmoid(z[..., n : 2 * n])
    res = project(z[..., 2 * n :].unflatten(-1, (n, n)), iters)
    return pre, post, res


def _fused_read(x, phi, bias, alpha, n: int, eps: float, iters: int):
    # Written as broadcast-and-reduce (not einsum/bmm) so the compiler emits one loop per pass over the stream;
    # Sinkhorn is the plain unrolled form, which the compiler fuses into one kernel and recomputes as it sees fit.
    pre, post, res = mhc_coefficients(x, phi, bias, alpha, n, eps, iters, project=sinkhorn_reference)
    return (pre.to(x.dtype).unsqueeze(-1) * x).sum(-2), post, res


def _fused_write(x, y, post, res):
    mixed = (res.to(x.dtype).unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
    return mixed + post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)


def _fused_write_read(x, y, post, res, phi, bias, alpha, n: int, eps: float, iters: int):
    # One graph across a sublayer boundary: the compiler fuses the write with the next read's RMS pass, so the
    # widened stream is written once and read once fewer.
    x = _fused_write(x, y, post, res)
    return (x, *_fused_read(x, phi, bias, alpha, n, eps, iters))


class PendingWrite(NamedTuple):
    """The stream after a sublayer, not yet materialised: x' = H_res x + H_post^T y. The next read computes it in
    the same fused pass; `ManifoldStream.materialize` writes it out where a tensor is needed."""

    x: torch.Tensor
    y: torch.Tensor
    post: torch.Tensor
    res: torch.Tensor


@functools.cache
def _compiled(fn):
    # Compiled lazily, once per process; every connection shares the graph (parameters are graph inputs).
    return torch.compile(fn, fullgraph=True)


class ManifoldConnection(Connection):
    def __init__(
        self,
        d_model: int,
        n: int,
        sublayer_index: int,
        cfg: MHCConfig,
        depth_scale: float | None,
        signal: PropagationScalar | None,
    ):
        super().__init__(depth_scale, signal)
        self.n, self.iters, self.eps = n, cfg.sinkhorn_iters, cfg.norm_eps
        self.fused = cfg.kernel == "fused"
        self.kernel = cfg.kernel
        self.sublayer_index, self.cfg = sublayer_index, cfg
        self.phi = nn.Parameter(torch.empty(n * d_model, n * n + 2 * n))
        self.bias = nn.Parameter(torch.empty(n * n + 2 * n))
        self.alpha = nn.Parameter(torch.empty(3))  # alpha_pre, alpha_post, alpha_res
        self.alpha.no_weight_decay = True
        reset_own_parameters(self)

    def init_parameter(self, name: str, t: torch.Tensor, generator: torch.Generator | None) -> None:
        cfg, n = self.cfg, self.n
        if name == "phi":
            # Random under either bias init: with phi = 0 and permutation-symmetric biases every gradient is
            # symmetric and the streams would never separate.
            _init_phi(t, cfg, generator)
        elif name == "alpha":
            t.fill_(cfg.gate_init)
        elif cfg.init == "hc":  # the bias, HC-faithful: soft one-hot read of stream k mod n, near-identity mixing;
            t.zero_()  # b_post = 0 (H_post = 1)
            t[:n] = -cfg.pre_logit
            t[self.sublayer_index % n] = cfg.pre_logit
            t[2 * n :] = (cfg.res_logit * torch.eye(n, device=t.device)).flatten()
        else:  # init == "megatron": all biases 0 (pre = 0.5, res = J/n)
            t.zero_()

    def logits(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        return mhc_logits(x, self.phi, self.bias, self.alpha, self.n, self.eps, fused)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mhc_coefficients(x, self.phi, self.bias, self.alpha, self.n, self.eps, self.iters)

    def read(self, x: torch.Tensor):
        if self.kernel == "triton":
            _, h, post, res = triton_stream.read(x, None, None, None, self, x)
            return h, (post, res)
        if self.fused:
            h, post, res = _compiled(_fused_read)(x, self.phi, self.bias, self.alpha, self.n, self.eps, self.iters)
            return h, (post, res)
        # Reference path (kernel=eager): einsum lowers to bmm, and Sinkhorn recomputes its iterations in backward.
        pre, post, res = self.coefficients(x)
        return torch.einsum("...i,...ic->...c", pre.to(x.dtype), x), (post, res)

    def observe(self, res: torch.Tensor) -> None:
        if self.record and self.last_mix is None:  # the step's first micro-batch, as the per-block gains
            self.last_mix = res[0].detach().mean(0)  # token average over the first sequence (diagnostics)

    def write(self, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        post, res = ctx
        self.observe(res)
        if self.kernel == "triton":
            return triton_stream.write(x, y, post, res)
        if self.fused:
            return _compiled(_fused_write)(x, y, post, res)
        mixed = torch.einsum("...ij,...jc->...ic", res.to(x.dtype), x)
        return mixed + post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)


@RESIDUAL_STREAMS.register("mhc", config=MHCConfig)
class ManifoldStream(ResidualStream):
    """Expand by repeating; collapse by summing, or by a learned pre-only head sigma(alpha (x phi)/rms + b) + eps."""

    def __init__(self, d_model: int, cfg: MHCConfig, norm_eps: float = 1e-6):
        super().__init__()
        self.d_model, self.cfg, self.streams = d_model, cfg, cfg.streams
        if cfg.collapse == "head":
            n = cfg.streams
            self.head_phi = nn.Parameter(torch.empty(n * d_model, n))
            self.head_bias = nn.Parameter(torch.empty(n))
            self.head_alpha = nn.Parameter(torch.empty(1))
            reset_own_parameters(self)

    def init_parameter(self, name: str, t: torch.Tensor, generator: torch.Generator | None) -> None:
        """The collapse head: phi as the connections' phi, bias 0, alpha = gate_init."""
        if name == "head_phi":
            _init_phi(t, self.cfg, generator)
        else:
            t.fill_(self.cfg.gate_init if name == "head_alpha" else 0.0)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.streams, h.shape[-1]).contiguous()

    def block(self, x, sublayers):
        """kernel=fused: each sublayer's write is left pending and computed in one compiled pass with the next
        read, inside the block and across block boundaries; eager: the per-sublayer reference."""
        if self.cfg.kernel == "triton":  # the same fusion, and the stream inside the block recomputed in backward
            return triton_stream.block(x, sublayers)
        if self.cfg.kernel != "fused":
            return super().block(self.materialize(x), sublayers)
        for s in sublayers:
            c = s.connection
            if isinstance(x, PendingWrite):
                x, h, post, res = _compiled(_fused_write_read)(*x, c.phi, c.bias, c.alpha, c.n, c.eps, c.iters)
            else:
                h, post, res = _compiled(_fused_read)(x, c.phi, c.bias, c.alpha, c.n, c.eps, c.iters)
            c.observe(res)
            x = PendingWrite(x, c.sublayer(h, s.norm, s.fn), post, res)
        return x

    def materialize(self, x):
        if isinstance(x, triton_stream.Pending):
            return triton_stream.materialize(x)
        return _compiled(_fused_write)(*x) if isinstance(x, PendingWrite) else x

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        x = self.materialize(x)
        if self.cfg.collapse == "sum":
            return x.sum(-2)
        xf = x.flatten(-2).float()
        rms = torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        w = torch.sigmoid(self.head_alpha * (xf @ self.head_phi.float()) / rms + self.head_bias) + 1e-6
        return torch.einsum("...i,...ic->...c", w.to(x.dtype), x)

    def connection(self, sublayer_index, depth_scale, signal) -> Connection:
        return ManifoldConnection(self.d_model, self.streams, sublayer_index, self.cfg, depth_scale, signal)


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Switch a built mHC model's stream kernel (eager | fused | triton) in place, e.g. to time them side by side
    on one model; the parameters are shared by all three."""
    Kernel(kernel)  # an unknown name fails here
    for m in model.modules():
        if isinstance(m, (ManifoldStream, ManifoldConnection)):  # a copy: the run's configuration is read-only
            m.cfg = dataclasses.replace(m.cfg, kernel=kernel)
        if isinstance(m, ManifoldConnection):
            m.kernel, m.fused = kernel, kernel == "fused"
