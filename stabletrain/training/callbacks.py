"""Trainer callbacks that belong to training itself (monitoring callbacks live in stabletrain.monitoring)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from stabletrain.models.moe import maxvio
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


def global_loads(trainer) -> torch.Tensor:
    """[n_moe_layers, n_routed] tokens routed per expert since the last reset, summed over all ranks."""
    loads = torch.stack([r.load for r in trainer.model.routers()])
    if trainer.world > 1:
        dist.all_reduce(loads)
    return loads


def update_router_biases(routers, loads: torch.Tensor) -> None:
    """Each router's balancing update (aux-free: b_i += u * sign(mean load - load_i)). `loads` are global, so
    every rank makes the same update."""
    for router, load in zip(routers, loads):
        router.after_step(load)


class MoEBalance(Callback):
    """After every step: global expert loads -> MaxVio metrics and the aux-free bias update; after evaluation:
    MaxVio over the whole validation pass (moe/maxvio_global)."""

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        routers = trainer.model.routers()
        loads = global_loads(trainer)
        if not metrics.get("update_skipped"):  # a vetoed step leaves the balancing state alone too
            update_router_biases(routers, loads)
        per_layer = [maxvio(load) for load in loads]
        metrics["moe/maxvio_batch"] = sum(per_layer) / len(per_layer)
        first = trainer.cfg.model.ffn.first_dense
        for i, (v, load) in enumerate(zip(per_layer, loads)):
            metrics[f"moe/maxvio_batch/{first + i}"] = v
            metrics[f"moe/load/{first + i}"] = load.long().tolist()
        aux = [r.aux_loss.item() for r in routers if r.aux_loss is not None]
        if aux:
            metrics["moe/aux_loss"] = sum(aux)
        self._reset(routers)

    def on_eval_begin(self, trainer, step: int) -> None:
        self._reset(trainer.model.routers())

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        loads = global_loads(trainer)
        metrics["moe/maxvio_global"] = sum(maxvio(load) for load in loads) / len(loads)
        self._reset(trainer.model.routers())

    @staticmethod
    def _reset(routers) -> None:
        for r in routers:
            r.load.zero_()
