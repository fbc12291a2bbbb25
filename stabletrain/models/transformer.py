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
from stabletrain.models.moe import MoE
from stabletrain.models.residual import Connection, PropagationScalar, ResidualStream, build_stream


def is_moe_layer(cfg: ModelConfig, layer_index: int) -> bool:
    return cfg.ffn == "moe" and layer_index >= cfg.moe.first_dense


def rope_dim(cfg: ModelConfig) -> int:
    """Rotary dimension per head: the decoupled RoPE part for MLA, the whole head otherwise."""
    return cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.d_model // cfg.n_heads


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
        if cfg.attention == "mla":
            from stabletrain.models.mla import MultiHeadLatentAttention

            self.attn = MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla, cfg.norm_eps)
        else:
            self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.qk_norm, cfg.norm_eps)
        self.attn_res = stream.connection(2 * layer_index, depth_scale, signal())
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if is_moe_layer(cfg, layer_index):
            self.mlp = MoE(cfg.d_model, cfg.moe)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.mlp_res = stream.connection(2 * layer_index + 1, depth_scale, signal())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = () if attn_mask is None else (attn_mask,)  # MLA takes none: validate() rejects doc_mask with it
        x = self.attn_res(x, self.attn_norm, lambda h: self.attn(h, cos, sin, *mask))
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
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.out_proj_init == "scaled" else std
        out_std *= self.cfg.residual.out_init_mult
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "w_down"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V], or the mean next-token cross-entropy when targets are given.
        doc_ids [B, T] (optional): attention stays within each document of a packed sequence."""
        cos, sin = rope_tables(idx.shape[1], rope_dim(self.cfg), self.cfg.rope_theta, idx.device)
        attn_mask = None
        if doc_ids is not None:
            causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=idx.device).tril()
            attn_mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
        x = self.stream.expand(self.embed(idx))
        for i, block in enumerate(self.blocks):
            if self.probe is not None:
                self.probe.observe(i, x)
            x = block(x, cos, sin, attn_mask)
        if self.probe is not None:
            self.probe.observe(len(self.blocks), x)
        logits = self.head(self.norm(self.stream.collapse(x)))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        if self.cfg.logit_z_loss:  # pushes log Z towards 0 so the softmax normaliser cannot drift (PaLM)
            loss = loss + self.cfg.logit_z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        aux = [r.aux_loss for r in self.routers() if r.aux_loss is not None]
        return loss + torch.stack(aux).sum() if aux else loss

    def routers(self) -> list:
        """The MoE routers, in depth order (empty for dense models)."""
        return [b.mlp.router for b in self.blocks if isinstance(b.mlp, MoE)]


    def connections(self) -> list[Connection]:
        """The 2L residual connections in order (attention, MLP of block 0, then block 1, ...)."""
        return [c for b in self.blocks for c in (b.attn_res, b.mlp_res)]


def residual_param_count(cfg: ModelConfig) -> int:
    """Parameters the residual-stream policy adds (methods.md §1 and §2 formulas)."""
    r, d, n, L = cfg.residual, cfg.d_model, cfg.residual.n, cfg.n_layers
    if r.kind == "hc":
        per = n * (n + 2) + (d * (n + 2) + 2 + d if r.dynamic else 0)  # static; dynamic W's, s_alpha, s_beta, norm
        return 2 * L * per
    if r.kind == "mhc":
        head = n * d * n + n + 1 if r.collapse == "head" else 0
        return 2 * L * ((n * n + 2 * n) * (n * d + 1) + 3) + head
    return 0


def _attn_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
    if cfg.attention == "mla":
        from stabletrain.models.mla import mla_param_count

        return mla_param_count(d, cfg.n_heads, cfg.mla)
    return d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2 + (2 * hd if cfg.qk_norm else 0)


def _ffn_params(cfg: ModelConfig, layer_index: int, active: bool = False) -> int:
    """Parameters of one block's feed-forward; active=True counts only what one token uses (top-K experts)."""
    d, m = cfg.d_model, cfg.moe
    if not is_moe_layer(cfg, layer_index):
        return 3 * d * cfg.ffn_dim
    routed = m.top_k if active else m.n_routed
    return m.n_routed * d + routed * 3 * d * m.expert_hidden + m.n_shared * 3 * d * m.expert_hidden


def param_count(cfg: ModelConfig, active: bool = False) -> int:
    """Closed-form parameter count (equals sum(p.numel()) of the built model); active=True: per token (MoE)."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    blocks = sum(_attn_params(cfg) + _ffn_params(cfg, i, active) + 2 * d for i in range(L))
    head = 0 if cfg.tie_embeddings else V * d
    return V * d + blocks + d + head + residual_param_count(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6 · (matmul parameters, head included, embedding lookup excluded) + 12 · L · n_heads · head_dim · seq_len.
    Residual-stream coefficients (HC/mHC) count as matmul parameters; their elementwise mixing is not counted."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    qk_dim = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else d // cfg.n_heads
    norms = 2 * d * L + d + (L * (cfg.mla.kv_lora_rank + (cfg.mla.q_lora_rank or 0)) if cfg.attention == "mla" else 0)
    matmul = param_count(cfg, active=True) - V * d - norms  # the embedding lookup is not a matmul
    if cfg.tie_embeddings:
        matmul += V * d  # ... but a tied head still is one
    return 6.0 * matmul + 12.0 * L * cfg.n_heads * qk_dim * seq_len
