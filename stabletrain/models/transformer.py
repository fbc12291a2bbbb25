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
from stabletrain.models.residual import Connection, PropagationScalar, ResidualStream, build_stream


class Block(nn.Module):
    """Pre-norm block of two sublayers, each wrapped by a residual connection of the model's stream policy.
    With the standard residual: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_index: int, stream: ResidualStream):
        super().__init__()
        # LayerNorm Scaling: block l (1-indexed) scales both pre-norm outputs by 1/sqrt(l).
        depth_scale = 1.0 / math.sqrt(layer_index + 1) if cfg.norm.depth_scaling == "lns" else None

        def signal():
            return PropagationScalar(cfg.bslo) if cfg.signal_scaling == "bslo" else None

        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads)
        self.attn_res = stream.connection(2 * layer_index, depth_scale, signal())
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.mlp_res = stream.connection(2 * layer_index + 1, depth_scale, signal())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.attn_res(x, self.attn_norm, lambda h: self.attn(h, cos, sin))
        return self.mlp_res(x, self.mlp_norm, self.mlp)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stream = build_stream(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, self.stream) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.probe = None  # diagnostics attach an object with observe(index, x) here; None costs nothing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.residual_init == "scaled" else std
        out_std *= self.cfg.residual.out_init_mult
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
        x = self.stream.expand(self.embed(idx))
        for i, block in enumerate(self.blocks):
            if self.probe is not None:
                self.probe.observe(i, x)
            x = block(x, cos, sin)
        if self.probe is not None:
            self.probe.observe(len(self.blocks), x)
        logits = self.head(self.norm(self.stream.collapse(x)))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))


    def connections(self) -> list[Connection]:
        """The 2L residual connections in order (attention, MLP of block 0, then block 1, ...)."""
        return [c for b in self.blocks for c in (b.attn_res, b.mlp_res)]


def residual_param_count(cfg: ModelConfig) -> int:
    """Parameters the residual-stream policy adds (methods.md §1 and §2 formulas)."""
    r, d, n, L = cfg.residual, cfg.d_model, cfg.residual.streams, cfg.n_layers
    if r.kind == "hc":
        per = n * (n + 2) + (d * (n + 2) + 2 + d if r.dynamic else 0)  # static; dynamic W's, s_alpha, s_beta, norm
        return 2 * L * per
    if r.kind == "mhc":
        head = n * d * n + n + 1 if r.collapse == "head" else 0
        return 2 * L * ((n * n + 2 * n) * (n * d + 1) + 3) + head
    return 0


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (equals sum(p.numel()) of the built model)."""
    d, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.d_model // cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    mlp = 3 * d * cfg.ffn_dim
    block = attn + mlp + 2 * d
    head = 0 if cfg.tie_embeddings else V * d
    return V * d + L * block + d + head + residual_param_count(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6 · (matmul parameters, head included, embedding lookup excluded) + 12 · L · n_heads · head_dim · seq_len.
    Residual-stream coefficients (HC/mHC) count as matmul parameters; their elementwise mixing is not counted."""
    d, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.d_model // cfg.n_heads
    matmul = L * (d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2 + 3 * d * cfg.ffn_dim) + V * d
    return 6.0 * (matmul + residual_param_count(cfg)) + 12.0 * L * cfg.n_heads * hd * seq_len
