"""The optimizer side every engine shares: AdamW with an update veto, parameter groups, the LR schedule and the
gradient-clip threshold."""

from __future__ import annotations

import math
from typing import Callable

import torch

from stabletrain.config import Config


class UpdateGate:
    """The one question an engine step asks, once, from inside the optimizer, where every gradient is reduced and
    nothing has changed yet: apply the update? `norm()` computes the global gradient norm there (and clips);
    `judge(norm)` answers (the spike guard); `on_apply(lr)` updates what the engine holds beside the optimizer (the
    expert-parallel experts) when the answer is yes."""

    def __init__(self, norm: Callable[[], object], judge: Callable[[object], bool], on_apply=None):
        self.norm, self.judge, self.on_apply = norm, judge, on_apply
        self.answer: bool | None = None  # None: never asked (the engine skipped the step itself)
        self.grad_norm = None

    def open(self, lr: float) -> bool:
        if self.answer is None:
            self.grad_norm = self.norm()
            self.answer = bool(self.judge(self.grad_norm))
            if self.answer and self.on_apply is not None:
                self.on_apply(lr)
        return self.answer


class GatedAdamW(torch.optim.AdamW):
    """torch AdamW whose step() asks its UpdateGate (once per engine step) whether to apply the update at all.

    DeepSpeed's ZeRO optimizers call step() once per parameter group; the first answer holds for the rest.
    """

    gate: UpdateGate | None = None

    def step(self, closure=None):
        if self.gate is not None and not self.gate.open(self.param_groups[0]["lr"]):
            return None
        return super().step(closure)

    def reset_gate(self) -> bool | None:
        """Clear the gate; the answer it gave this step (None when step() was never reached)."""
        answer = self.gate.answer if self.gate is not None else None
        self.gate = None
        return answer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on vectors (norm gains, biases) or on parameters flagged `no_weight_decay`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter's own data is its (flat) shard
        (no_decay if ndim < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, cfg: Config) -> float:
    """Schedule as a factor of optim.lr: linear warm-up, then cosine / WSD (to min_lr_ratio), constant, or step."""
    o = cfg.optim
    total = o.total_steps or cfg.trainer.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":  # constant, then drops to step_factors[i] at each milestone fraction of training
        factor = 1.0
        for milestone, f in zip(o.step_milestones, o.step_factors):
            if step >= milestone * total:
                factor = f
        return factor
    if o.schedule == "cosine":
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - int(o.decay_fraction * total)  # wsd: warm-up, stable, then linear decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - o.min_lr_ratio) * progress


def rewind_scheduler(scheduler, last_epoch: int) -> None:
    """Put an LR scheduler back to `last_epoch` (it was stepped although the update was vetoed)."""
    scheduler.last_epoch = last_epoch - 1
    scheduler.step()


def clip_threshold(cfg: Config, step: int) -> float:
    """The gradient-norm clip for (1-based) `step`: optim.grad_clip, ramped up linearly from
    grad_clip_warmup_start x grad_clip over the first grad_clip_warmup_steps steps when that is set."""
    o = cfg.optim
    if not o.grad_clip:
        return math.inf
    if step > o.grad_clip_warmup_steps:
        return o.grad_clip
    return o.grad_clip * (
        o.grad_clip_warmup_start + (1 - o.grad_clip_warmup_start) * (step - 1) / o.grad_clip_warmup_steps
    )


def first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The first weight, buffer, optimizer master weight or optimizer moment holding NaN/Inf on this rank, by
    name, or None. Under ZeRO the optimizer's parameters are this rank's fp32 master partitions."""
    names = {id(p): n for n, p in model.named_parameters()}

    def bad(t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t.detach()).all())

    for name, p in model.named_parameters():
        if bad(p):
            return f"weight {name}"
    for name, b in model.named_buffers():
        if bad(b):
            return f"buffer {name}"
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where = names.get(id(p), f"param group {gi} (ZeRO partition)")
            if bad(p):
                return f"optimizer master weight {where}"
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and bad(value):
                    return f"optimizer state {key} of {where}"
    return None
