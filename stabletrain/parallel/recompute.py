"""Activation checkpointing (`engine.activation_checkpointing`), applied from outside the model by wrapping its
`run_blocks`:

- block: each segment of `engine.activation_checkpointing_blocks` consecutive blocks keeps only its input stream
  and recomputes everything inside it in backward. One block per segment is the usual full recomputation; longer
  segments are the mHC paper's recompute of the widened stream, which keeps the n-stream input only every L_r
  blocks (0: L_r = sqrt(nL/(n+2)), aligned to pipeline stages, since a stage's layer list is cut into segments);
- selective: per block, the outputs of matmuls and attention are kept and the cheap rest (norms, activations,
  residual mixing, routing) is recomputed, as in Megatron's selective recomputation and torchtitan's op-level
  policy.

Forward passes have side effects a recomputation must not repeat: MoE routers count tokens per expert, BSLO scalars
update their running norms. The recomputation runs against the module buffers as they were before the original
forward (so it recomputes exactly the same values) and leaves them as they were after it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from stabletrain.config import Config, checkpoint_segment

_aten = torch.ops.aten
KEPT_BY_SELECTIVE = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _buffers(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [b for m in modules for b in m.buffers()]


class CheckpointedBlocks:
    """Stands in for `model.run_blocks`: runs each segment of blocks under torch.utils.checkpoint."""

    def __init__(self, model: nn.Module, mode: str, segment: int):
        self.model, self.mode, self.segment = model, mode, segment
        self.run = model.run_blocks  # the plain loop, bound before it is replaced

    def __call__(self, x, start: int, end: int, ctx):
        for first in range(start, end, self.segment):
            x = self._segment(x, first, min(first + self.segment, end), ctx)
        return x

    def _segment(self, x, start: int, end: int, ctx):
        """x may be a fused stream's pending write (a tuple of tensors): it crosses the segment boundary as it
        would cross a block boundary, so the numbers equal those without recomputation."""
        buffers = _buffers(list(self.model.blocks[start:end]))
        before = [b.clone() for b in buffers]
        calls = 0

        def run(x):
            # The original forward and the recomputation run the same buffer copies (selective checkpointing
            # replays the forward's ops one for one): first back to the state the forward saw, at the end the
            # recomputation puts back the state the forward left (the forward copies its buffers onto themselves).
            nonlocal calls
            calls += 1
            after = [b.clone() for b in buffers]
            with torch.no_grad():
                for b, saved in zip(buffers, before):
                    b.copy_(saved)
            try:
                return self.run(x, start, end, ctx)
            finally:
                with torch.no_grad():
                    for b, saved in zip(buffers, after):
                        b.copy_(saved if calls > 1 else b)

        context = (
            functools.partial(create_selective_checkpoint_contexts, _keep_matmuls) if self.mode == "selective" else None
        )
        kwargs = {"context_fn": context} if context is not None else {}
        return checkpoint(run, x, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, cfg: Config) -> None:
    """Wrap `model.run_blocks` for engine.activation_checkpointing (none: leave the model alone)."""
    mode = cfg.engine.activation_checkpointing
    if mode == "none":
        return
    model.run_blocks = CheckpointedBlocks(model, mode, checkpoint_segment(cfg))
