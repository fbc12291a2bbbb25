"""Hyper-Connections (Zhu et al., arXiv 2409.19606), docs/methods.md §1.

n streams H[B,T,n,C]. Per sublayer: read h = A_m^T H, write H' = B^T T(h) + A_r^T H. Static parameters
B (write), A_m (read), A_r (mix); dynamic ones add s * tanh(norm(H) W) per stream. Paper init (W = 0, B = 1,
A_m = e_{k mod n}, A_r = I) makes the network equal to pre-norm at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stabletrain.config import ResidualConfig
from stabletrain.config.fields import at_least
from stabletrain.models.init import reset_own_parameters
from stabletrain.models.layers import RMSNorm
from stabletrain.models.residual.base import RESIDUAL_STREAMS, Connection, PropagationScalar, ResidualStream


@dataclass
class HCConfig(ResidualConfig):
    """Hyper-Connections (model/residual=hc)."""

    kind: str = "hc"
    streams: int = at_least(1, 4)  # expansion rate n (the paper's 4)
    dynamic: bool = True  # input-dependent coefficients on top of the static ones
    tanh: bool = True  # tanh on the dynamic coefficients
    gate_init: float = at_least(0, 0.01)  # s_alpha = s_beta at init
    out_init_sqrt_n: bool = True  # x sqrt(n) on the attention/MLP output projections' init std (the HC paper)


def _static(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t)
    p.no_weight_decay = True  # HC's static coefficients are not decayed
    return p


class HyperConnection(Connection):
    def __init__(
        self,
        d_model: int,
        n: int,
        sublayer_index: int,
        cfg: HCConfig,
        norm_eps: float,
        depth_scale: float | None,
        signal: PropagationScalar | None,
    ):
        super().__init__(depth_scale, signal)
        self.n, self.dynamic, self.use_tanh = n, cfg.dynamic, cfg.tanh
        self.sublayer_index, self.gate_init = sublayer_index, cfg.gate_init
        self.B = _static(torch.empty(n))
        self.A_m = _static(torch.empty(n))
        self.A_r = _static(torch.empty(n, n))
        if self.dynamic:
            self.norm = RMSNorm(d_model, norm_eps)
            # [W_beta | W_m | W_r] in one matrix: one matmul per sublayer instead of three.
            self.W = nn.Parameter(torch.empty(d_model, n + 2))
            self.s_alpha = nn.Parameter(torch.empty(1))  # 1-d: DeepSpeed cannot flatten 0-d params
            self.s_beta = nn.Parameter(torch.empty(1))
        reset_own_parameters(self)

    def init_parameter(self, name: str, t: torch.Tensor, generator: torch.Generator | None) -> None:
        """The paper's init, which makes the network equal to pre-norm at step 0: B = 1, A_m = e_(k mod n),
        A_r = I, W = 0, the gates s_alpha = s_beta = gate_init."""
        if name == "A_m":
            t.zero_()[self.sublayer_index % self.n] = 1.0
        elif name == "A_r":
            t.copy_(torch.eye(self.n))
        else:
            t.fill_({"B": 1.0, "W": 0.0, "s_alpha": self.gate_init, "s_beta": self.gate_init}[name])

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(t) if self.use_tanh else t

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B [..,n], A_m [..,n], A_r [..,n,n]); static ones broadcast, dynamic ones per token."""
        if not self.dynamic:
            return self.B, self.A_m, self.A_r
        proj = self._act(self.norm(x) @ self.W)  # per stream (norm over C): [.., n, n+2]
        B = self.B + self.s_beta * proj[..., 0]
        A_m = self.A_m + self.s_alpha * proj[..., 1]
        A_r = self.A_r + self.s_alpha * proj[..., 2:]
        return B, A_m, A_r

    def read(self, x: torch.Tensor):
        B, A_m, A_r = self.coefficients(x)
        h = torch.einsum("...i,...ic->...c", A_m.to(x.dtype).expand(*x.shape[:-2], -1), x)
        return h, (B, A_r)

    def write(self, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        B, A_r = ctx
        A_r = A_r.to(x.dtype).expand(*x.shape[:-2], -1, -1)
        if self.record and self.last_mix is None:
            # x' = M x with M = A_r^T; the token average over the first sequence of the step's first
            # micro-batch (the one the per-block gains use).
            self.last_mix = A_r[0].detach().float().mean(0).transpose(-1, -2)
        mixed = torch.einsum("...ij,...ic->...jc", A_r, x)
        return mixed + B.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)


@RESIDUAL_STREAMS.register("hc", config=HCConfig)
class HyperStream(ResidualStream):
    """Expand by repeating the embedding n times; collapse by summing the streams (the paper's choice)."""

    def __init__(self, d_model: int, cfg: HCConfig, norm_eps: float):
        super().__init__()
        self.d_model, self.cfg, self.norm_eps = d_model, cfg, norm_eps
        self.streams = cfg.streams

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.streams, h.shape[-1]).contiguous()

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-2)

    def connection(self, sublayer_index, depth_scale, signal) -> Connection:
        return HyperConnection(self.d_model, self.streams, sublayer_index, self.cfg, self.norm_eps, depth_scale, signal)
