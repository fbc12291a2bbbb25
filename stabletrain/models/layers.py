"""Building blocks of the decoder: RMSNorm, rotary embeddings, causal attention (MHA/GQA, registered as
model/attention=mha|gqa), SwiGLU MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import AttentionConfig, ConfigError
from stabletrain.config.fields import at_least
from stabletrain.models.parts import ATTENTIONS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (F.rms_norm); it accumulates the mean-square in fp32 for bf16 activations.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim/2] for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension; x is [B, H, T, D]. The tables are computed in fp32; the rotation
    runs in the activations' dtype (no fp32 copy of q and k)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention; grouped-query when n_kv_heads < n_heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads} do not divide evenly")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # QK-norm (Dehghani et al. 2023; OLMo 2): bounds the attention logits, which otherwise grow and spike.
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.kv_cache = None  # set by generation (stabletrain.interop.generate); training never uses it

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """attn_mask: optional boolean [B, 1, T, T] (True = may attend), e.g. causal within documents."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:  # generation: earlier positions' keys and values, then these
            k, v = self.kv_cache.extend(k, v)
        causal = attn_mask is None and q.shape[2] == k.shape[2]  # one new query attends to every cached position
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


@dataclass
class GQAConfig(AttentionConfig):
    """Grouped-query attention (model/attention=gqa): n_kv_heads key/value heads shared by groups of query heads."""

    kind: str = "gqa"
    n_kv_heads: Optional[int] = at_least(1, None)  # required; must divide model.n_heads

    def kv_heads(self, model) -> int:
        return self.n_kv_heads

    def check(self, model) -> None:
        super().check(model)
        if self.n_kv_heads is None or model.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model/attention=gqa needs model.attention.n_kv_heads dividing model.n_heads={model.n_heads}, got "
                f"{self.n_kv_heads}"
            )


@ATTENTIONS.register("mha", config=AttentionConfig)
@ATTENTIONS.register("gqa", config=GQAConfig)
def causal_self_attention(cfg, layer_index: int) -> CausalSelfAttention:
    a = cfg.attention
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, a.kv_heads(cfg), a.qk_norm, cfg.norm_eps)
