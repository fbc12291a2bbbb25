"""What a model keeps in memory for backward, measured on our own modules at full size without allocating it.

One block (and the head) runs under torch's FakeTensorMode: every tensor has its real shape and dtype but no
storage, so a 27B model's block at 4096 tokens costs milliseconds. A saved-tensor hook counts the distinct storages
autograd keeps; a dispatch hook counts the outputs selective recomputation keeps (the ops it must save, from
stabletrain.parallel.recompute). The planner multiplies these per-token numbers out; nothing is a formula that a new
residual stream or feed-forward would have to extend.

MoE layers route data-dependently; here every expert receives the same share of the tokens (a balanced router),
through the same gather / expert / scatter the local dispatch runs. Fused mHC kernels are measured on their eager
reference (the fused path keeps ~3% less).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from stabletrain.config import ModelConfig
from stabletrain.config.frozen import thawed
from stabletrain.models.layers import RMSNorm, rope_tables
from stabletrain.models.moe import MoE
from stabletrain.models.residual import build_stream
from stabletrain.models.transformer import Block, rope_dim
from stabletrain.parallel.recompute import KEPT_BY_SELECTIVE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _balanced_dispatch(experts, flat, idx, gates, token_of_slot):
    """The local dispatch with every expert receiving len(idx) / n_experts slots (shapes only matter here)."""
    out = torch.zeros_like(flat)
    share = idx.numel() // len(experts)
    for e, expert in enumerate(experts):
        slots = slice(e * share, (e + 1) * share)
        tokens = token_of_slot[slots]
        out.index_add_(0, tokens, expert(flat[tokens]) * gates[slots, None])
    return out


class _KeptOutputs(TorchDispatchMode):
    """Sums the bytes of the outputs of the ops selective recomputation keeps."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in KEPT_BY_SELECTIVE:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    self.bytes += t.numel() * t.element_size()
        return out


class _SavedStorages(torch.autograd.graph.saved_tensors_hooks):
    """Counts the distinct storages autograd saves for backward, less the modules' own parameters and buffers
    (counted once, as weights, not per token)."""

    def __init__(self, *modules: torch.nn.Module):
        own = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        self.exclude = {StorageWeakRef(t.untyped_storage()) for t in own}
        self.storages: dict[StorageWeakRef, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self.exclude:
            self.storages[ref] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> _SavedStorages:
        super().__enter__()
        return self

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@dataclass
class BlockFootprint:
    """Bytes per token of one block (one micro-batch): what autograd keeps (`saved`), what selective recomputation
    keeps (`selective`, the block's input included), and the residual stream crossing its boundary (`stream`)."""

    saved: float
    selective: float
    stream: float


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    for p in module.parameters():  # parameters only, as DeepSpeed casts them (buffers keep their dtype)
        p.data = p.data.to(dtype)
    return module


def _eager(cfg: ModelConfig) -> ModelConfig:
    cfg = thawed(cfg)
    if hasattr(cfg.residual, "kernel"):
        cfg.residual.kernel = "eager"  # compiled kernels cannot run on storage-less tensors
    return cfg


def block_footprint(cfg: ModelConfig, layer_index: int, seq_len: int, dtype: str) -> BlockFootprint:
    cfg, dt = _eager(cfg), DTYPES[dtype]
    with FakeTensorMode():
        stream = build_stream(cfg)
        block = _cast(Block(cfg, layer_index, stream), dt)
        if isinstance(block.mlp, MoE):
            block.mlp.dispatch = _balanced_dispatch
        x = stream.expand(torch.empty(1, seq_len, cfg.d_model, dtype=dt)).requires_grad_()
        cos, sin = rope_tables(seq_len, rope_dim(cfg), cfg.rope_theta)
        with _SavedStorages(block) as saved:
            stream.materialize(block(x, cos, sin, None))
        kept = _KeptOutputs()
        with torch.no_grad(), kept:
            stream.materialize(block(x, cos, sin, None))
        stream_bytes = x.numel() * x.element_size()
    return BlockFootprint(saved.bytes / seq_len, (kept.bytes + stream_bytes) / seq_len, stream_bytes / seq_len)


def head_footprint(cfg: ModelConfig, seq_len: int, dtype: str) -> float:
    """Bytes per token the collapse, final norm, output head and loss keep (logits in fp32 for the loss)."""
    cfg, dt = _eager(cfg), DTYPES[dtype]
    with FakeTensorMode():
        stream = build_stream(cfg)
        norm = _cast(RMSNorm(cfg.d_model, cfg.norm_eps), dt)
        head = _cast(torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), dt)
        x = stream.expand(torch.empty(1, seq_len, cfg.d_model, dtype=dt)).requires_grad_()
        targets = torch.zeros(1, seq_len, dtype=torch.long)
        with _SavedStorages(norm, head) as saved:
            logits = head(norm(stream.collapse(x)))
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return saved.bytes / seq_len
