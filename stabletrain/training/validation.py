"""Validation loss over a fixed slice of the held-out split: the same samples at every evaluation, spread over the
data-parallel replicas, averaged over all of them."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from stabletrain.engine.base import Engine


@torch.no_grad()
def validation_loss(engine: Engine, data, micro: int, batches: int) -> dict:
    """{val_loss, val_ppl} over `batches` global batches of `micro` samples per replica from data.val."""
    layout = engine.layout
    engine.eval()
    total = torch.zeros((), device=engine.device)
    for b in range(batches):
        first = (b * layout.data_parallel + layout.dp_rank) * micro
        batch = data.val.get(torch.arange(first, first + micro).numpy() % len(data.val))
        total += engine.eval_loss(batch, data.model_kwargs)
    if layout.world > 1:
        dist.all_reduce(total)  # every stage of a pipeline holds its replica's loss: the mean is unchanged
    engine.train()
    val_loss = float(total) / (batches * layout.world)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}
