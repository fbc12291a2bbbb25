"""Trainer callbacks: the hooks, their registry, and the callbacks that belong to training itself.

The loop stays short; everything around it hangs off these hooks. `trainer.callbacks` (a config list of
registered names) chooses them; each registered factory builds its callback for a trainer, or returns None when
it does not apply (no MoE layers, logging off, ...). Monitoring callbacks (metric sinks, gains, forensics)
register themselves in stabletrain.monitoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stabletrain.models.moe import maxvio
from stabletrain.registry import Registry

CALLBACKS = Registry("callback")


@dataclass
class SpikeContext:
    """What spike forensics may look at: the step's result and data, the weights, and where checkpoints are."""

    result: Any  # stabletrain.training.detectors.StepResult
    batch_index: int
    positions: list[int]  # global stream positions of `tokens`' rows
    sample_ids: list[int] | None
    tokens: torch.Tensor  # [rows, seq_len + 1], every rank's rows (gathered)
    weights: dict[str, torch.Tensor] | None  # fp32 weights now (None: ranks hold shards)
    adam_state: dict[str, dict] | None  # per-parameter Adam moments (None where they are partitioned)
    checkpoints: Path
    window_mean: Callable[[str], float]  # the detector window's mean for a metric
    would_fire: Callable[[str, float], bool]  # whether a metric's detector would fire on a value (nothing recorded)
    history: list[tuple]  # (step, loss, grad_norm, fired) of recent steps


class Callback:
    """Hooks the trainer calls; subclasses override what they need. metrics dicts may be extended in place."""

    def on_step_begin(self, trainer, step: int) -> None: ...

    def on_step_end(self, trainer, step: int, metrics: dict) -> None: ...

    def on_eval_begin(self, trainer, step: int) -> None: ...

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None: ...

    def on_log(self, trainer, row: dict) -> None:
        """A metrics row to record (metrics.jsonl, W&B, the console)."""

    def on_event(self, trainer, kind: str, step: int, fields: dict) -> None:
        """An event (spike, skip_step, rollback, resume, ...) to record."""

    def on_alert(self, trainer, title: str, text: str, wait_s: float) -> None: ...

    def on_spike(self, trainer, ctx: SpikeContext) -> dict | None:
        """A detector fired; may return {path, cause} of a forensics report."""

    def on_rewind(self, trainer, step: int) -> None:
        """A rollback restored `step`: what was logged after it belongs to an abandoned timeline."""

    def on_checkpoint(self, trainer, step: int, tag_dir: Path) -> None: ...

    def close(self) -> None: ...


def local_blocks(trainer) -> list:
    """The blocks this rank runs (a pipeline stage's, or all of them)."""
    return [trainer.model.blocks[i] for i in trainer.engine.stage_blocks()]


def merge_stages(trainer, part: dict) -> dict | None:
    """Collective: on rank 0, the union of every stage's `part` (keys are per layer); None elsewhere."""
    parts = trainer.engine.stage_gather(part)
    return None if parts is None else {k: v for p in parts for k, v in p.items()}


@CALLBACKS.register("signal_sync")
class SignalScalarSync(Callback):
    """Average the BSLO norm EMAs over data-parallel ranks after each step, so every rank applies the same alpha."""

    @classmethod
    def build(cls, trainer) -> "SignalScalarSync | None":
        return cls() if trainer.model.signal_scalars(range(len(trainer.model.blocks))) else None

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        scalars = trainer.model.signal_scalars(trainer.engine.stage_blocks())
        if trainer.engine.layout.data_parallel > 1 and scalars:
            flat = trainer.engine.dp_all_reduce(torch.stack([t for m in scalars for t in (m.ema_in, m.ema_out)]))
            flat /= trainer.engine.layout.data_parallel
            for i, m in enumerate(scalars):
                m.ema_in.copy_(flat[2 * i])
                m.ema_out.copy_(flat[2 * i + 1])
        alphas = merge_stages(trainer, {id(m): m.alpha().item() for m in scalars})
        if alphas:
            metrics["bslo/alpha_min"], metrics["bslo/alpha_max"] = min(alphas.values()), max(alphas.values())


def local_routers(trainer) -> dict[int, object]:
    """block index -> router, for the MoE blocks this rank runs."""
    return trainer.model.routers_of(trainer.engine.stage_blocks())


def global_loads(trainer, routers: dict[int, object]) -> torch.Tensor:
    """[local MoE layers, n_routed] tokens routed per expert since the last reset, summed over the data-parallel
    replicas of this stage."""
    if not routers:
        return torch.zeros(0)
    return trainer.engine.dp_all_reduce(torch.stack([r.load for r in routers.values()]))


def update_router_biases(routers, loads: torch.Tensor) -> None:
    """Each router's balancing update (aux-free: b_i += u * sign(mean load - load_i)). `loads` are global, so
    every rank makes the same update."""
    for router, load in zip(routers, loads):
        router.after_step(load)


@CALLBACKS.register("moe_balance")
class MoEBalance(Callback):
    """After every step: global expert loads -> MaxVio metrics and the routers' balancing update; after
    evaluation: MaxVio over the whole validation pass (moe/maxvio_global). Under pipeline stages each stage
    balances its own layers and rank 0 assembles the metrics."""

    @classmethod
    def build(cls, trainer) -> "MoEBalance | None":
        return cls() if trainer.model.routers() else None

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        routers = local_routers(trainer)
        loads = global_loads(trainer, routers)
        if not metrics.get("update_skipped"):  # a vetoed step leaves the balancing state alone too
            update_router_biases(routers.values(), loads)
        part = {
            i: (load, r.aux_loss.item() if r.aux_loss is not None else None)
            for (i, r), load in zip(routers.items(), loads)
        }
        layers = merge_stages(trainer, part)
        if layers:
            per_layer = {i: maxvio(load) for i, (load, _) in sorted(layers.items())}
            metrics["moe/maxvio_batch"] = sum(per_layer.values()) / len(per_layer)
            for i, v in per_layer.items():
                metrics[f"moe/maxvio_batch/{i}"] = v
                metrics[f"moe/load/{i}"] = layers[i][0].long().tolist()
            aux = [a for _, a in layers.values() if a is not None]
            if aux:
                metrics["moe/aux_loss"] = sum(aux)
        self._reset(routers.values())

    def on_eval_begin(self, trainer, step: int) -> None:
        self._reset(local_routers(trainer).values())

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        routers = local_routers(trainer)
        layers = merge_stages(trainer, dict(zip(routers, (maxvio(l) for l in global_loads(trainer, routers)))))
        if layers:
            metrics["moe/maxvio_global"] = sum(layers.values()) / len(layers)
        self._reset(routers.values())

    def on_rewind(self, trainer, step: int) -> None:
        self._reset(local_routers(trainer).values())  # the abandoned step's expert loads

    @staticmethod
    def _reset(routers) -> None:
        for r in routers:
            r.load.zero_()


def build_callbacks(names: list[str], trainer, main_rank: bool) -> list[Callback]:
    """The configured callbacks that apply to this run, in order (registered with `main_rank_only = True`:
    rank 0 only)."""
    out = []
    for name in names:
        cls = CALLBACKS[name].obj
        if getattr(cls, "main_rank_only", False) and not main_rank:
            continue
        cb = cls.build(trainer)
        if cb is not None:
            out.append(cb)
    return out
