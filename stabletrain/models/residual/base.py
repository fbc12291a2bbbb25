"""The residual-stream interface and the standard residual.

    stream.expand(h[B,T,C]) -> x                 once, after the embedding
    connection(x, norm, fn) -> x'                 once per sublayer (attention, MLP)
    stream.collapse(x) -> h[B,T,C]                once, before the final norm

A connection reads the sublayer input from the stream, applies the block's pre-norm, the optional depth scale
(LayerNorm Scaling) and the sublayer, the optional propagation scalar (BSLO), and writes the result back. The
standard residual is the trivial case: read x, write x + y.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stabletrain.config import BSLOConfig


class PropagationScalar(nn.Module):
    """BSLO alpha = EMA|h| / (EMA|h + F(h)| + eps) on the sublayer output; no gradient, frozen in eval (experimental).

    Both EMAs are of per-token L2 norms, in fp32, updated after alpha is read (alpha only uses past batches).
    """

    def __init__(self, cfg: BSLOConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("ema_in", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_out", torch.zeros((), dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def alpha(self) -> torch.Tensor:
        if self.updates.item() < self.cfg.warmup_steps:
            return torch.ones((), device=self.ema_in.device)
        ratio = self.ema_in / (self.ema_out + self.cfg.eps)
        return ratio.clamp(self.cfg.clamp_min, self.cfg.clamp_max)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.alpha()
        if self.training:
            with torch.no_grad():
                m = self.cfg.momentum
                first = self.updates.item() == 0
                n_in = h.float().norm(dim=-1).mean()
                n_out = (h.float() + y.float()).norm(dim=-1).mean()
                self.ema_in.copy_(n_in if first else m * self.ema_in + (1 - m) * n_in)
                self.ema_out.copy_(n_out if first else m * self.ema_out + (1 - m) * n_out)
                self.updates += 1
        return y * a.to(y.dtype)


class Connection(nn.Module):
    """One residual connection around one sublayer. Subclasses define read() and write()."""

    def __init__(self, depth_scale: float | None = None, signal: PropagationScalar | None = None):
        super().__init__()
        self.depth_scale = depth_scale
        self.signal = signal
        self.record = False  # diagnostics: keep the last mixing matrix (see last_mix)
        self.last_mix: torch.Tensor | None = None

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        return x, None

    def write(self, x: torch.Tensor, y: torch.Tensor, ctx: object) -> torch.Tensor:
        return x + y

    def forward(self, x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h, ctx = self.read(x)
        z = norm(h)
        if self.depth_scale is not None:
            z = z * self.depth_scale
        y = fn(z)
        if self.signal is not None:
            y = self.signal(h, y)
        return self.write(x, y, ctx)


class ResidualStream(nn.Module):
    """Standard residual: one stream, expand and collapse are identities."""

    streams = 1

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def connection(self, sublayer_index: int, depth_scale: float | None, signal: PropagationScalar | None) -> Connection:
        return Connection(depth_scale, signal)

    @staticmethod
    def token_norms(x: torch.Tensor) -> torch.Tensor:
        """Per-token L2 norm of the whole stream state ([B,T,C] or [B,T,n,C]) -> [B,T]."""
        return x.float().flatten(2).norm(dim=-1)
