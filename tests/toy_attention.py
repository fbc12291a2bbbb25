"""An attention kind defined outside the package, the way a user adds one: a module that registers it (loaded by
STABLETRAIN_PLUGINS=tests.toy_attention) plus a preset YAML. Causal attention with one fused qkv projection and no
positional encoding (NoPE), its heads' outputs scaled by a learned-free `temperature`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import AttentionConfig
from stabletrain.config.fields import positive
from stabletrain.models.parts import ATTENTIONS


@dataclass
class ToyAttentionConfig(AttentionConfig):
    kind: str = "toy"
    temperature: float = positive(1.0)  # divides the attention logits


class NoPEAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, temperature: float):
        super().__init__()
        self.n_heads, self.temperature = n_heads, temperature
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos, sin, attn_mask=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        scale = 1.0 / ((C // self.n_heads) ** 0.5 * self.temperature)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


@ATTENTIONS.register("toy", config=ToyAttentionConfig)
def toy_attention(cfg, layer_index: int) -> NoPEAttention:
    return NoPEAttention(cfg.d_model, cfg.n_heads, cfg.attention.temperature)
