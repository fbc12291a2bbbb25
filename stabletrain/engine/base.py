"""The engine interface: everything the training loop asks of an engine, and nothing of DeepSpeed itself.

    engine.forward(inputs, targets, **model_kwargs) -> loss     one micro-batch
    engine.backward(loss)
    engine.step(step, judge) -> StepOutcome                     after the last micro-batch of a step: clip, ask
                                                                `judge(grad_norm)` whether to apply the update
                                                                (the spike veto), apply it or leave every state
                                                                untouched (weights, moments, LR schedule)
    engine.micro_step()                                         after every other micro-batch
    engine.lr, engine.device, engine.train(), engine.eval()
    engine.save(root, step, client_state, keep) -> tag_dir      a verified, safely loadable checkpoint
    engine.load(tag_dir) -> client_state
    engine.first_nonfinite() -> str | None                      NaN/Inf anywhere in weights or optimizer state
    engine.full_weights() -> dict | None                        fp32 weights when this rank holds them all
    engine.adam_state() -> dict | None                          per-parameter Adam moments (forensics)

The data-parallel implementation is stabletrain.engine.deepspeed_engine.DeepSpeedEngine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class StepOutcome:
    grad_norm: float | None  # the global pre-clip gradient norm
    applied: bool | None  # whether the update reached the weights; None: the engine skipped it itself (overflow)


class Engine(ABC):
    device: torch.device
    model: torch.nn.Module  # the plain single-device module (on this rank: its shard of experts)

    @abstractmethod
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, **model_kwargs) -> torch.Tensor: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def micro_step(self) -> None: ...

    @abstractmethod
    def step(self, step: int, judge: Callable[[float | None], bool]) -> StepOutcome: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def train(self) -> None: ...

    @abstractmethod
    def eval(self) -> None: ...

    @abstractmethod
    def save(self, root: Path, step: int, client_state: dict, keep: int) -> Path: ...

    @abstractmethod
    def load(self, tag_dir: Path) -> dict: ...

    @abstractmethod
    def first_nonfinite(self) -> str | None: ...

    @abstractmethod
    def full_weights(self) -> dict[str, torch.Tensor] | None: ...

    @abstractmethod
    def adam_state(self) -> dict[str, dict] | None: ...
