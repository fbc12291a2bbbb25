"""Loss-spike detection and the veto on the optimizer update (docs/methods.md §7).

Per step, before the update is applied, the detectors see the global mean loss and the pre-clip gradient norm:

    rolling z-score   value > mean + sigma * std of the last `window` accepted values (after a warm-up),
                      and >= min_ratio * mean (3 for the gradient norm: small batches make it noisy)
    k x recent max    value > max_ratio * max of the same window
    non-finite        NaN/Inf loss or gradient norm: the update never reaches the weights

A firing picks a response (the most severe of the firing detectors'): log < skip_step < escalate < rollback < stop.
Every response but `log` vetoes the update. The veto sits inside the optimizer (stabletrain.optim.GatedAdamW),
the one place every DeepSpeed path (ZeRO 0-3, bf16) passes after it has the global gradient norm and before the weights
or the Adam moments change. Values of steps that fired are not added to the windows, so a spike does not
widen the band that would catch the next one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import torch

from stabletrain.config import DetectorConfig, MonitorConfig

SEVERITY = {"log": 0, "skip_step": 1, "escalate": 2, "rollback": 3, "stop": 4}


class RollingDetector:
    """style `stabletrain`: one-sided z-score (plus min_ratio) and the k x max rule over clean values only.
    style `olmo_core`: OLMo-core's SkipStepOptimizer rule, |value - mean| > sigma * std over the window of all
    recent values, spikes included (the ratio rules are off)."""

    def __init__(self, metric: str, cfg: DetectorConfig, warmup: int, style: str = "stabletrain"):
        self.metric, self.cfg, self.warmup, self.style = metric, cfg, warmup, style
        self.values: deque[float] = deque(maxlen=cfg.window)
        self.accepted = 0

    def check(self, value: float) -> Firing | None:
        """The firing (rule, threshold) for this value, or None."""
        c = self.cfg
        if not c.enabled or self.accepted < self.warmup or len(self.values) < 2:
            return None
        vals = torch.tensor(list(self.values), dtype=torch.float64)
        mean, std = vals.mean().item(), vals.std().item()
        z = (value - mean) / max(std, 1e-12)
        if self.style == "olmo_core":
            if c.sigma and abs(value - mean) > c.sigma * std:
                threshold = mean + math.copysign(c.sigma * std, value - mean)
                return Firing("spike", self.metric, "zscore_two_sided", value, threshold, z)
            return None
        if c.sigma and value > mean + c.sigma * std and value >= c.min_ratio * mean:
            return Firing("spike", self.metric, "zscore", value, mean + c.sigma * std, z)
        recent_max = vals.max().item()
        if c.max_ratio and value > c.max_ratio * recent_max:
            return Firing("spike", self.metric, "max_ratio", value, c.max_ratio * recent_max)
        return None

    def accept(self, value: float) -> None:
        self.values.append(value)
        self.accepted += 1

    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


class Action(StrEnum):
    """What the loop does about a step (the guard's decision)."""

    CONTINUE = "continue"
    SKIP = "skip"  # the update was vetoed; go on
    LR_CUT = "lr_cut"  # vetoed, and the learning rate cut for a while (the escalation ladder)
    ROLLBACK = "rollback"  # restore the newest verified checkpoint, skip the batches around the spike
    STOP = "stop"  # save and stop with a user error's status
    ABORT = "abort"  # save and stop with the escalation ladder's own status


@dataclass(frozen=True)
class Firing:
    """One detector's firing: a spike (a rule over a rolling window) or a non-finite value."""

    kind: str  # spike | nonfinite
    metric: str  # loss | grad_norm
    rule: str  # zscore | zscore_two_sided | max_ratio | nonfinite
    value: float
    threshold: float | None = None
    zscore: float | None = None

    def fields(self) -> dict:
        """The event's fields (None-valued ones left out)."""
        return {k: v for k, v in asdict(self).items() if k != "kind" and v is not None}


@dataclass
class StepResult:
    """What the detectors made of one step, and whether its update reached the weights."""

    step: int
    loss: float
    grad_norm: float | None
    firings: list[Firing] = field(default_factory=list)
    response: str = "log"  # the configured response to the firings (the most severe one)
    applied: bool = True

    @property
    def fired(self) -> bool:
        return bool(self.firings)


@dataclass
class Decision:
    action: Action
    reason: str = ""
    skip: list[int] | None = None  # rollback: [start, end) of the global batches to skip
    at_least: int = 0  # rollback (escalate): skip at least this many batches from the restored one
    lr_scale: float = 1.0  # lr_cut: the factor ...
    until: int = 0  # ... through this step


class SpikeMonitor:
    """The detectors, their windows (checkpointed, so a resumed run sees the same history) and a short history
    of (step, loss, grad_norm) for forensics plots."""

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.detectors = {
            name: RollingDetector(name, getattr(cfg, name), cfg.warmup_steps, cfg.style)
            for name in ("loss", "grad_norm")
        }
        self.history: deque[tuple[int, float, float | None, bool]] = deque(maxlen=512)

    def judge(self, step: int, loss: float, grad_norm: float | None) -> StepResult:
        v = StepResult(step, loss, grad_norm)
        values = {"loss": loss, "grad_norm": grad_norm}
        nonfinite = [m for m, x in values.items() if x is not None and not math.isfinite(x)]
        if nonfinite:
            v.firings = [Firing("nonfinite", m, "nonfinite", values[m]) for m in nonfinite]
            v.response = self.cfg.nonfinite.response
        else:
            for name, det in self.detectors.items():
                if values[name] is None:
                    continue
                firing = det.check(values[name])
                if firing:
                    v.firings.append(firing)
            if v.firings:
                responses = [getattr(self.cfg, f.metric).response or self.cfg.response for f in v.firings]
                v.response = max(responses, key=SEVERITY.__getitem__)
            if not v.firings or self.cfg.style == "olmo_core":  # olmo_core keeps spikes in its window
                for name, det in self.detectors.items():
                    if values[name] is not None:
                        det.accept(values[name])
        v.applied = not v.fired or v.response == "log"
        self.history.append((step, loss, grad_norm, v.fired))
        return v

    def recent_loss_mean(self) -> float:
        return self.detectors["loss"].mean()

    def state_dict(self) -> dict:
        return {
            "windows": {n: list(d.values) for n, d in self.detectors.items()},
            "accepted": {n: d.accepted for n, d in self.detectors.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, det in self.detectors.items():
            det.values.clear()
            det.values.extend(state["windows"][name])
            det.accepted = state["accepted"][name]
        self.history.clear()
        self.history.extend(tuple(h) for h in state["history"])


class SkipList:
    """[start, end) ranges of global batch indices the loader jumps over: from `trainer.skip_batches` and from
    rollbacks. Batch b covers global samples [b·G, (b+1)·G) for the global batch size G."""

    def __init__(self, ranges=()):
        self.ranges: list[list[int]] = sorted([int(a), int(b)] for a, b in ranges)

    def add(self, start: int, end: int) -> None:
        self.ranges = sorted(self.ranges + [[start, end]])

    def merge(self, ranges) -> None:
        for a, b in ranges:
            if [a, b] not in self.ranges:
                self.add(a, b)

    def next_allowed(self, batch: int) -> int:
        """The first batch index >= batch outside every range."""
        moved = True
        while moved:
            moved = False
            for a, b in self.ranges:
                if a <= batch < b:
                    batch, moved = b, True
        return batch
