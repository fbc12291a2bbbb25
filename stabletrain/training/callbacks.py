"""Trainer callbacks that belong to training itself (monitoring callbacks live in stabletrain.monitoring)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from stabletrain.models.residual import PropagationScalar
from stabletrain.training.trainer import Callback


class SignalScalarSync(Callback):
    """Average the BSLO norm EMAs over data-parallel ranks after each step, so every rank applies the same alpha."""

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        scalars = [m for m in trainer.model.modules() if isinstance(m, PropagationScalar)]
        if not scalars:
            return
        if trainer.world > 1:
            flat = torch.stack([t for m in scalars for t in (m.ema_in, m.ema_out)])
            dist.all_reduce(flat)
            flat /= trainer.world
            for i, m in enumerate(scalars):
                m.ema_in.copy_(flat[2 * i])
                m.ema_out.copy_(flat[2 * i + 1])
        alphas = torch.stack([m.alpha() for m in scalars])
        metrics["bslo/alpha_min"], metrics["bslo/alpha_max"] = alphas.min().item(), alphas.max().item()
