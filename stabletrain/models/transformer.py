"""The decoder stack: embedding -> blocks -> final norm -> head.

A plain single-device module: engines, precision and parallelism are applied from outside. The blocks sit in
one ModuleList so that a pipeline split can partition the model by layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import ModelConfig
from stabletrain.models.layers import CausalSelfAttention, RMSNorm, SwiGLU, rope_tables


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.residual_init == "scaled" else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "w_down"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V], or the mean next-token cross-entropy when targets are given."""
        T = idx.shape[1]
        head_dim = self.cfg.d_model // self.cfg.n_heads
        cos, sin = rope_tables(T, head_dim, self.cfg.rope_theta, idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (equals sum(p.numel()) of the built model)."""
    d, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.d_model // cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    mlp = 3 * d * cfg.ffn_dim
    block = attn + mlp + 2 * d
    head = 0 if cfg.tie_embeddings else V * d
    return V * d + L * block + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6 · (matmul parameters, head included, embedding lookup excluded) + 12 · L · n_heads · head_dim · seq_len."""
    d, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.d_model // cfg.n_heads
    matmul = L * (d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2 + 3 * d * cfg.ffn_dim) + V * d
    return 6.0 * matmul + 12.0 * L * cfg.n_heads * hd * seq_len
