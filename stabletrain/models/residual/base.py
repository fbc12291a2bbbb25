"""The residual-stream interface, its registry, and the standard residual.

    stream.expand(h[B,T,C]) -> x                 once, after the embedding
    stream.block(x, sublayers) -> x'             once per block: for each sublayer, read from the stream, apply
                                                 the block's pre-norm, the optional depth scale (LayerNorm
                                                 Scaling), the sublayer and the optional propagation scalar
                                                 (BSLO), and write back
    stream.collapse(x) -> h[B,T,C]               once, before the final norm

Each sublayer has its own Connection (its parameters: mixing coefficients). The stream sees a whole block at once
so that a fused implementation can merge the write after one sublayer with the read before the next (one pass
over the widened stream instead of two); the per-sublayer `Connection.forward` is the reference it must equal.
A variant is one module: a ResidualStream subclass registered with its config dataclass, plus a preset YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from stabletrain.config import ConfigError, ResidualConfig, SignalConfig
from stabletrain.config.fields import at_least, between, positive
from stabletrain.models.parts import SIGNALS
from stabletrain.registry import Registry

RESIDUAL_STREAMS = Registry("residual stream", group="model/residual")


@dataclass
class BSLOConfig(SignalConfig):
    """model/signal=bslo: the propagation scalar alpha_l = E|h_in| / (E|h_in + F| + eps) on each sublayer's
    output, an EMA measured without gradient (experimental)."""

    kind: str = "bslo"
    momentum: float = between(0, 1, 0.99, hi_open=True)  # EMA momentum of the norms
    eps: float = positive(1e-6)
    clamp_min: float = positive(0.1)  # alpha's lower clamp
    clamp_max: float = positive(10.0)  # alpha's upper clamp
    warmup_steps: int = at_least(0, 50)  # alpha = 1 until this many training forwards

    def check(self, model) -> None:
        if self.clamp_min > self.clamp_max:
            raise ConfigError(
                f"model.signal.clamp_min={self.clamp_min} is above model.signal.clamp_max={self.clamp_max}"
            )


@SIGNALS.register("bslo", config=BSLOConfig)
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
        # Branch-free on the device (no host sync per sublayer; the planner measures it on fake tensors).
        ratio = (self.ema_in / (self.ema_out + self.cfg.eps)).clamp(self.cfg.clamp_min, self.cfg.clamp_max)
        return torch.where(self.updates < self.cfg.warmup_steps, torch.ones_like(ratio), ratio)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.alpha()
        if self.training:
            with torch.no_grad():
                m, first = self.cfg.momentum, self.updates == 0
                n_in = h.float().norm(dim=-1).mean()
                n_out = (h.float() + y.float()).norm(dim=-1).mean()
                self.ema_in.copy_(torch.where(first, n_in, m * self.ema_in + (1 - m) * n_in))
                self.ema_out.copy_(torch.where(first, n_out, m * self.ema_out + (1 - m) * n_out))
                self.updates += 1
        return y * a.to(y.dtype)


class Connection(nn.Module):
    """One residual connection around one sublayer. Subclasses define read() and write()."""

    def __init__(self, depth_scale: float | None = None, signal: PropagationScalar | None = None):
        super().__init__()
        self.depth_scale = depth_scale
        self.signal = signal
        self.record = False  # diagnostics: keep the mixing matrix of the step's first forward (see last_mix)
        self.last_mix: torch.Tensor | None = None

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        return x, None

    def write(self, x: torch.Tensor, y: torch.Tensor, ctx: object) -> torch.Tensor:
        return x + y

    def sublayer(self, h: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What runs between read and write: pre-norm, depth scale, the sublayer, the propagation scalar."""
        z = norm(h)
        if self.depth_scale is not None:
            z = z * self.depth_scale
        y = fn(z)
        return self.signal(h, y) if self.signal is not None else y

    def forward(self, x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h, ctx = self.read(x)
        return self.write(x, self.sublayer(h, norm, fn), ctx)


class Sublayer(NamedTuple):
    connection: Connection
    norm: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]


@RESIDUAL_STREAMS.register("standard", config=ResidualConfig)
class ResidualStream(nn.Module):
    """Standard residual: one stream, expand and collapse are identities, x + F(norm(x)) per sublayer."""

    streams = 1

    def __init__(self, d_model: int = 0, cfg: ResidualConfig | None = None, norm_eps: float = 1e-6):
        super().__init__()

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def connection(
        self, sublayer_index: int, depth_scale: float | None, signal: PropagationScalar | None
    ) -> Connection:
        return Connection(depth_scale, signal)

    def block(self, x: torch.Tensor, sublayers: list[Sublayer]) -> torch.Tensor:
        """One block: every sublayer through its connection, in order (fused streams override this; they may
        return the stream in a pending form that only the next block or `materialize` reads)."""
        for s in sublayers:
            x = s.connection(x, s.norm, s.fn)
        return x

    def materialize(self, x) -> torch.Tensor:
        """The stream as a tensor (a fused stream's pending write, written out)."""
        return x

    @staticmethod
    def token_norms(x: torch.Tensor) -> torch.Tensor:
        """Per-token L2 norm of the whole stream state ([B,T,C] or [B,T,n,C]) -> [B,T]."""
        return x.float().flatten(2).norm(dim=-1)


def build_stream(cfg) -> ResidualStream:
    """The stream registered under model.residual.kind."""
    return RESIDUAL_STREAMS[cfg.residual.kind].obj(cfg.d_model, cfg.residual, cfg.norm_eps)
