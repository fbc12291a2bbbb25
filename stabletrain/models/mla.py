"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1), training form.

Keys and values are reconstructed from a small per-token latent c_kv; RoPE is carried by separate
"decoupled" query/key dimensions because a rotation cannot be folded into the low-rank up-projection.
At inference the up-projections can be absorbed so that only c_kv and k_rope are cached; that trick is
not needed for training and is not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import AttentionConfig, ConfigError
from stabletrain.config.fields import at_least
from stabletrain.models.layers import RMSNorm, apply_rope
from stabletrain.models.parts import ATTENTIONS


@dataclass
class MLAConfig(AttentionConfig):
    """Multi-head latent attention (model/attention=mla; DeepSeek-V2/V3): low-rank compressed Q and KV, decoupled
    RoPE key."""

    kind: str = "mla"
    q_lora_rank: int = at_least(0, 0)  # 0: queries projected directly from x (no compression)
    kv_lora_rank: int = at_least(1, 64)  # rank of the compressed key/value latent
    qk_nope_head_dim: int = at_least(1, 32)  # per-head query/key dimension without RoPE
    qk_rope_head_dim: int = at_least(2, 16)  # decoupled rotary key/query dimension (shared key)
    v_head_dim: int = at_least(1, 32)  # per-head value dimension

    doc_mask = False  # no per-document mask (data.doc_mask)

    def head_dim(self, model) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def rope_dim(self, model) -> int:
        return self.qk_rope_head_dim

    def check(self, model) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"model.attention.qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings"
            )
        if self.qk_norm:
            raise ConfigError("model.attention.qk_norm applies to mha|gqa (MLA normalises its latents already)")


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA. forward(x, cos, sin) expects cos/sin = rope_tables(T, cfg.qk_rope_head_dim, theta):
    rotary tables of the *rope* head dim, not of d_model // n_heads."""

    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, norm_eps: float = 1e-6):
        super().__init__()
        if cfg.qk_rope_head_dim % 2 or cfg.qk_rope_head_dim <= 0:
            raise ValueError(f"qk_rope_head_dim={cfg.qk_rope_head_dim} must be positive and even (half-split RoPE)")
        if cfg.kv_lora_rank <= 0 or cfg.q_lora_rank < 0:
            raise ValueError(f"kv_lora_rank={cfg.kv_lora_rank} must be > 0 and q_lora_rank={cfg.q_lora_rank} >= 0")
        self.n_heads = n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank > 0:
            # Compressed queries: only cuts activation memory in training (DeepSeek-V2 §2.1.2).
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        # One down-projection yields the KV latent and a single rope key shared by all heads (MQA-style).
        self.kv_a_proj = nn.Linear(d_model, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(c_kv)).view(B, T, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        # Position enters only through the decoupled dims; k_rope is [B, 1, T, rope_dim], broadcast over heads.
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(B, H, T, self.rope_dim)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        # SDPA allows v's head dim to differ from q/k's; default scale is 1/sqrt(nope_dim + rope_dim).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


def mla_param_count(d_model: int, n_heads: int, cfg: MLAConfig) -> int:
    """Closed-form parameter count of MultiHeadLatentAttention (RMSNorm weights included)."""
    qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank > 0:
        q = d_model * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n_heads * qk_dim
    else:
        q = d_model * n_heads * qk_dim
    kv = (
        d_model * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank
        + cfg.kv_lora_rank * n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    )
    return q + kv + n_heads * cfg.v_head_dim * d_model


@ATTENTIONS.register("mla", config=MLAConfig)
def latent_attention(cfg, layer_index: int) -> MultiHeadLatentAttention:
    return MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.attention, cfg.norm_eps)
