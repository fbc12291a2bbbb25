"""The engine interface: everything the training loop asks of an engine, and nothing of DeepSpeed itself.

    engine.forward_backward(batches, model_kwargs, loss_hook) -> loss      one optimizer step's micro-batches:
                                                                          forward and backward, gradients
                                                                          accumulated; the mean loss of this
                                                                          data-parallel replica
    engine.step(step, judge) -> StepOutcome                               clip, ask `judge(grad_norm)` whether to
                                                                          apply the update (the spike veto),
                                                                          apply it or leave every state untouched
                                                                          (weights, moments, LR schedule)
    engine.eval_loss(batch, model_kwargs) -> loss                         one validation micro-batch
    engine.lr, engine.lr_scale, engine.device, engine.layout, engine.train(), engine.eval()
                                                                          (lr_scale multiplies the schedule's
                                                                          rate: a spike ladder's cut)
    engine.stage_blocks() -> range                                        the blocks this rank runs
    engine.dp_all_reduce(t), engine.stage_gather(obj)                     collectives over the replicas of a
                                                                          stage / from every stage to rank 0
    engine.save(root, step, client_state, keep, writer) -> tag_dir        a verified, safely loadable checkpoint
    engine.load(tag_dir) -> client_state
    engine.first_nonfinite() -> str | None                                NaN/Inf in weights or optimizer state
    engine.full_weights() -> dict | None                                  fp32 weights when this rank holds them
    engine.adam_state() -> dict | None                                    per-parameter Adam moments (forensics)

Before the model exists, an engine class says what each rank will hold (`rank_plan`: the blocks it runs and the
parameters it materializes), so that nothing is allocated that the rank does not own.

Implementations: stabletrain.engine.deepspeed_engine.DeepSpeedEngine (data parallel, ZeRO 0-3) and
stabletrain.engine.pipeline.PipelineEngine (pipeline stages x data parallel, ZeRO 0-1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from stabletrain.config import RankLayout
from stabletrain.parallel.materialize import Ownership

ModelKwargs = Callable[[torch.Tensor], dict]  # a [B, seq_len+1] batch -> extra model inputs (doc_ids)
LossHook = Callable[[torch.Tensor], torch.Tensor]  # applied to each micro-batch's loss before backward


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor | float | None  # the global pre-clip gradient norm (possibly still on the device)
    applied: bool | None  # whether the update reached the weights; None: the engine skipped it itself (overflow)


@dataclass
class RankPlan:
    """What one rank holds: the blocks it runs and the parameters it materializes (its layer-list entries
    `parts[stage]..parts[stage + 1] - 1` in a pipeline)."""

    blocks: range
    ownership: Ownership
    parts: list[int] | None = None


class Engine(ABC):
    device: torch.device
    model: torch.nn.Module  # the plain single-device module (this rank runs stage_blocks() of it)
    layout: RankLayout
    dp_group: Any = None  # the data-parallel replicas of this rank's stage (None: the whole world)

    @abstractmethod
    def forward_backward(self, batches: list[torch.Tensor], model_kwargs: ModelKwargs, loss_hook: LossHook):
        """-> the mean loss (a 0-d tensor) of this data-parallel replica over `batches`."""

    @abstractmethod
    def step(self, step: int, judge: Callable[[float | None], bool]) -> StepOutcome: ...

    @abstractmethod
    def eval_loss(self, batch: torch.Tensor, model_kwargs: ModelKwargs) -> torch.Tensor: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def train(self) -> None: ...

    @abstractmethod
    def eval(self) -> None: ...

    @abstractmethod
    def save(self, root: Path, step: int, client_state: dict, keep: int, writer=None) -> Path:
        """A checkpoint; with a background `writer` (checkpoint.background) only the copy to host memory blocks."""

    @abstractmethod
    def layout_record(self) -> dict:
        """The layout (ranks, stages, ZeRO stage, ...) a checkpoint's manifest records."""

    @abstractmethod
    def load(self, tag_dir: Path) -> dict: ...

    @abstractmethod
    def first_nonfinite(self) -> str | None: ...

    @abstractmethod
    def full_weights(self) -> dict[str, torch.Tensor] | None: ...

    @abstractmethod
    def adam_state(self) -> dict[str, dict] | None: ...

    def stage_blocks(self) -> range:
        return range(len(self.model.blocks))

    def dp_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas of this rank's stage, in place."""
        if self.layout.data_parallel > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def stage_gather(self, obj: Any) -> list | None:
        """Collective: on rank 0, `obj` of the first data-parallel replica of every stage, in stage order; None
        on the other ranks. Stages hold different blocks, so per-layer diagnostics are assembled this way."""
        if self.layout.world == 1:
            return [obj]
        out = [None] * self.layout.world if self.layout.rank == 0 else None
        dist.gather_object(obj if self.layout.dp_rank == 0 else None, out, dst=0)
        if out is None:
            return None
        return [out[s * self.layout.data_parallel] for s in range(self.layout.stages)]
