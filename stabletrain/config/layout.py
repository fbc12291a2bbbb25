"""How a run's ranks divide: pipeline stages x data-parallel replicas (expert parallelism splits the data-parallel
ranks of a stage further), and the batch arithmetic that follows from it.

    world = pipeline_stages x data_parallel         rank = stage x data_parallel + data-parallel index
    global batch = micro_batch_size x grad_accum x data_parallel   (sequences per optimizer step)

Either `trainer.global_batch_size` is set (gradient accumulation is derived, so a run resumed on another number
of ranks keeps its batch) or `trainer.grad_accum_steps` (default 1), not both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from stabletrain.config.fields import ConfigError
from stabletrain.config.schema import Config


def launched_world_size(cfg: Config) -> int:
    """The ranks a run will have: trainer.plan_world_size when planning, else the launcher's WORLD_SIZE (or 1)."""
    if cfg.trainer.plan and cfg.trainer.plan_world_size:
        return cfg.trainer.plan_world_size
    return int(os.environ.get("WORLD_SIZE", 1))


def data_parallel_size(cfg: Config, world: int) -> int:
    return world // cfg.engine.pipeline_stages


def grad_accum_steps(cfg: Config, world: int) -> int:
    """Micro-batches per optimizer step on each data-parallel replica."""
    t = cfg.trainer
    if t.global_batch_size is None:
        return t.grad_accum_steps or 1
    per_pass = t.micro_batch_size * data_parallel_size(cfg, world)
    if t.global_batch_size % per_pass:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{t.micro_batch_size} x {data_parallel_size(cfg, world)} data-parallel rank(s) = {per_pass}"
        )
    return t.global_batch_size // per_pass


def global_batch_size(cfg: Config, world: int) -> int:
    return cfg.trainer.micro_batch_size * grad_accum_steps(cfg, world) * data_parallel_size(cfg, world)


def checkpoint_segment(cfg: Config, stage_blocks: int | None = None) -> int:
    """Blocks per layer of the layer list: 1, or block-mode activation checkpointing's segment length (0: the mHC
    paper's L_r = sqrt(n L / (n + 2)) over the blocks of one pipeline stage, rounded)."""
    e = cfg.engine
    if e.activation_checkpointing != "block":
        return 1
    if e.activation_checkpointing_blocks:
        return e.activation_checkpointing_blocks
    blocks = stage_blocks or math.ceil(cfg.model.n_layers / e.pipeline_stages)
    n = cfg.model.residual.streams
    return max(1, round(math.sqrt(n * blocks / (n + 2))))


# The engines' own rules (a layout DeepSpeed's pipeline refuses, say), registered next to their engine when its
# module is imported (stabletrain.cli imports the engines); each raises one ConfigError line.
LAYOUT_RULES: list[Callable[[Config, int], None]] = []


def check_layout(cfg: Config, world: int) -> None:
    """One ConfigError line for a layout the ranks, the model or DeepSpeed cannot run."""
    e, t = cfg.engine, cfg.trainer
    P, ep = e.pipeline_stages, e.expert_parallel
    if t.global_batch_size is not None and t.grad_accum_steps is not None:
        raise ConfigError(
            "set trainer.global_batch_size or trainer.grad_accum_steps, not both (accumulation is derived from the "
            "global batch)"
        )
    if world % P:
        raise ConfigError(f"engine.pipeline_stages={P} does not divide the number of ranks ({world})")
    dp = world // P
    if ep > 1 and dp % ep:
        raise ConfigError(
            f"engine.expert_parallel={ep} does not divide the {dp} data-parallel rank(s) of each pipeline stage "
            f"({world} ranks / engine.pipeline_stages={P})"
        )
    for rule in LAYOUT_RULES:
        rule(cfg, world)
    grad_accum_steps(cfg, world)


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits: DeepSpeed's pipe x data topology (the data-parallel index varies fastest)."""

    world: int
    rank: int
    stages: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world // self.stages

    @property
    def stage(self) -> int:
        return self.rank // self.data_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank % self.data_parallel

    def stage_ranks(self, stage: int) -> list[int]:
        """The data-parallel replicas of one pipeline stage."""
        return [stage * self.data_parallel + d for d in range(self.data_parallel)]

    def pipeline_ranks(self, dp_rank: int) -> list[int]:
        """The stages of one pipeline (one data-parallel replica), first to last."""
        return [s * self.data_parallel + dp_rank for s in range(self.stages)]
