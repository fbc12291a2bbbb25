"""The decoder stack: embedding -> blocks -> final norm -> head.

A plain single-device module: engines, precision and parallelism are applied from outside. The blocks sit in
one ModuleList so that a pipeline split can partition the model by layer. Parameter and FLOP counts come from
the model itself, built on the meta device (no memory), so every variant is counted without a formula.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import ModelConfig
from stabletrain.models.feedforward import build_ffn
from stabletrain.models.init import init_tensor, named_parameter_owners
from stabletrain.models.layers import RMSNorm, rope_tables
from stabletrain.models.moe import MoE
from stabletrain.models.parts import ATTENTIONS, SIGNALS
from stabletrain.models.residual import Connection, PropagationScalar, Sublayer, build_stream


def rope_dim(cfg: ModelConfig) -> int:
    """Rotary dimension per head, as the attention kind says (MLA: its decoupled RoPE part)."""
    return cfg.attention.rope_dim(cfg)


class BlockContext(NamedTuple):
    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None


class BlockSpec(NamedTuple):
    """The registered parts block `layer_index` is built from (stabletrain.models.parts)."""

    attention: Callable[[], nn.Module]
    ffn: Callable[[], nn.Module]
    depth_scale: float | None
    signal: Callable[[], nn.Module | None]


def block_spec(cfg: ModelConfig, layer_index: int) -> BlockSpec:
    return BlockSpec(
        attention=lambda: ATTENTIONS[cfg.attention.kind].obj(cfg, layer_index),
        ffn=lambda: build_ffn(cfg.d_model, cfg.ffn, layer_index),
        depth_scale=cfg.norm.scale(layer_index),
        signal=lambda: SIGNALS[cfg.signal.kind].obj(cfg.signal),
    )


class Block(nn.Module):
    """Pre-norm block of two sublayers (attention, feed-forward), each with a connection of the model's residual
    stream, which runs the block as a whole. With the standard residual: x + attn(norm(x)), then + mlp(norm(x)).
    The parts come from the block's spec: attention kind, feed-forward, depth scaling, signal scaling."""

    def __init__(self, cfg: ModelConfig, layer_index: int, stream):
        super().__init__()
        spec = block_spec(cfg, layer_index)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = spec.attention()
        self.attn_res = stream.connection(2 * layer_index, spec.depth_scale, spec.signal())
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = spec.ffn()
        self.mlp_res = stream.connection(2 * layer_index + 1, spec.depth_scale, spec.signal())
        self.run_block = stream.block  # a bound method, not a submodule: the stream stays registered once

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = () if attn_mask is None else (attn_mask,)  # only kinds that take one get one (validate)
        return self.run_block(
            x,
            [
                Sublayer(self.attn_res, self.attn_norm, lambda h: self.attn(h, cos, sin, *mask)),
                Sublayer(self.mlp_res, self.mlp_norm, self.mlp),
            ],
        )


class Transformer(nn.Module):
    """Built on the meta device (`meta_model`), it holds shapes only: stabletrain.parallel.materialize allocates
    each rank's part and initialises it with `init_tensor`. Built on a real device, it initialises itself: from
    `init_seed`, or from a seed drawn from the global RNG (so torch.manual_seed still decides the weights)."""

    def __init__(self, cfg: ModelConfig, init_seed: int | None = None):
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
        if not self.embed.weight.is_meta:
            self.init_weights(int(torch.randint(2**62, (), device="cpu")) if init_seed is None else init_seed)

    def init_weights(self, seed: int) -> None:
        """Every parameter from its own generator, seeded from `seed` and its name (stabletrain.models.init)."""
        for name, module, _, p in named_parameter_owners(self.named_modules()):
            init_tensor(self.cfg, name, module, p.data, seed)
        for b in self.buffers():
            b.zero_()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V], or the mean next-token cross-entropy (plus the routers' auxiliary losses) when targets
        are given. doc_ids [B, T] (optional): attention stays within each document of a packed sequence.

        The pieces (embed_tokens, run_blocks, logits, loss, aux_loss) are public so that an engine can run the
        model in parts: pipeline stages, or segments of blocks recomputed in backward."""
        x = self.run_blocks(self.embed_tokens(idx), 0, len(self.blocks), self.block_context(idx, doc_ids))
        logits = self.logits(x)
        if targets is None:
            return logits
        loss, aux = self.loss(logits, targets), self.aux_loss()
        return loss + aux if aux is not None else loss

    def block_context(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None, offset: int = 0) -> BlockContext:
        """What every block needs besides the stream: the rotary tables (of positions offset.., for generation with
        a KV cache) and the document mask."""
        cos, sin = rope_tables(offset + idx.shape[1], rope_dim(self.cfg), self.cfg.rope_theta, idx.device)
        cos, sin = cos[offset:], sin[offset:]
        attn_mask = None
        if doc_ids is not None:
            causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=idx.device).tril()
            attn_mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
        return BlockContext(cos, sin, attn_mask)

    def decode(self, idx: torch.Tensor, offset: int) -> torch.Tensor:
        """Logits of tokens at positions offset.. when the attention layers hold a KV cache of the earlier ones."""
        x = self.run_blocks(self.embed_tokens(idx), 0, len(self.blocks), self.block_context(idx, offset=offset))
        return self.logits(x)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.stream.expand(self.embed(idx))

    def run_blocks(self, x, start: int, end: int, ctx: BlockContext):
        """Blocks start..end-1 on the stream (which a fused stream may return pending: see materialize)."""
        for i in range(start, end):
            if self.probe is not None:  # diagnostics see the stream as a tensor at every block boundary
                x = self.stream.materialize(x)
                self.probe.observe(i, x)
            x = self.blocks[i](x, *ctx)
        if self.probe is not None and end == len(self.blocks):
            x = self.stream.materialize(x)
            self.probe.observe(end, x)
        return x

    def logits(self, x) -> torch.Tensor:
        return self.head(self.norm(self.stream.collapse(x)))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        if self.cfg.logit_z_loss:  # pushes log Z towards 0 so the softmax normaliser cannot drift (PaLM)
            loss = loss + self.cfg.logit_z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return loss

    def aux_loss(self, start: int = 0, end: int | None = None) -> torch.Tensor | None:
        """The sum of the auxiliary losses the routers of blocks start..end-1 set in the last training forward."""
        blocks = self.blocks[start:end]
        aux = [b.mlp.router.aux_loss for b in blocks if isinstance(b.mlp, MoE) and b.mlp.router.aux_loss is not None]
        return torch.stack(aux).sum() if aux else None

    def routers(self) -> list:
        """The MoE routers, in depth order (empty for dense models)."""
        return [b.mlp.router for b in self.blocks if isinstance(b.mlp, MoE)]

    def routers_of(self, blocks) -> dict[int, nn.Module]:
        """block index -> MoE router, for the MoE blocks among `blocks` (a pipeline stage's, say)."""
        return {i: self.blocks[i].mlp.router for i in blocks if isinstance(self.blocks[i].mlp, MoE)}

    def signal_scalars(self, blocks) -> list[nn.Module]:
        """The sublayers' output scalars (model/signal=bslo) in `blocks`: their state is synchronised after each
        step (stabletrain.training.callbacks)."""
        return [m for i in blocks for m in self.blocks[i].modules() if isinstance(m, PropagationScalar)]

    def connections(self) -> list[Connection]:
        """The 2L residual connections in order (attention, MLP of block 0, then block 1, ...)."""
        return [c for b in self.blocks for c in (b.attn_res, b.mlp_res)]


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: its structure and parameter shapes, no memory."""
    with torch.device("meta"):
        return Transformer(cfg)


def _inactive_expert_params(model: nn.Module) -> float:
    """Routed-expert parameters a token does not use ((1 - top_k/n_routed) of each MoE layer's experts)."""
    return sum(
        (1 - m.active_fraction()) * sum(p.numel() for p in m.experts.parameters())
        for m in model.modules()
        if isinstance(m, MoE)
    )


def count_params(model: Transformer, active: bool = False) -> int:
    """Parameters of a built model; active=True: those one token uses (top-K of the routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    return round(total - _inactive_expert_params(model)) if active else total


def model_flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6 · (active matmul parameters) + 12 · L · n_heads · qk_head_dim · seq_len, where the matmul parameters are
    every parameter with two or more dimensions except the embedding table (a lookup), the output head counted
    even when it is tied to the embedding. Residual-stream coefficient matrices (HC/mHC) count; their
    element-wise mixing does not."""
    cfg = model.cfg
    matmul = sum(
        p.numel()
        for name, p in model.named_parameters(remove_duplicate=False)
        if p.ndim >= 2 and not name.startswith("embed.")
    )
    matmul -= _inactive_expert_params(model)
    qk_dim = cfg.attention.head_dim(cfg)
    return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.n_heads * qk_dim * seq_len


def param_count(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of the model the config builds (on the meta device: no memory)."""
    return count_params(meta_model(cfg), active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return model_flops_per_token(meta_model(cfg), seq_len)
