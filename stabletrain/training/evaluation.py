"""Validation loss over a fixed slice of the held-out split: the same samples at every evaluation, spread over the
ranks, averaged over all of them."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from stabletrain.engine.base import Engine


@torch.no_grad()
def evaluate(engine: Engine, data, micro: int, batches: int, rank: int, world: int) -> dict:
    """{val_loss, val_ppl} over `batches` global batches of `micro` samples per rank from data.val."""
    engine.eval()
    total = torch.zeros((), device=engine.device)
    for b in range(batches):
        first = (b * world + rank) * micro
        batch = data.val.get(torch.arange(first, first + micro).numpy() % len(data.val)).to(engine.device)
        total += engine.forward(batch[:, :-1], batch[:, 1:], **data.model_kwargs(batch)).float()
    if world > 1:
        dist.all_reduce(total)
    engine.train()
    val_loss = float(total) / (batches * world)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}
