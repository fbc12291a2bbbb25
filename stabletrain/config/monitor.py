"""The `monitor` group's schema: spike detectors, the responses to a spike, fault injection for tests, and the
signal-gain diagnostics' interval (docs/spikes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from stabletrain.config.choices import DetectorStyle, InjectKind, NonfiniteResponse, Response
from stabletrain.config.fields import at_least, between, finite


@dataclass
class DetectorConfig:
    """One rolling detector over a per-step scalar: fires when the value exceeds mean + sigma * std of the last
    `window` values (and min_ratio times their mean), or max_ratio times their maximum."""

    enabled: bool = True  # the detector fires at all
    window: int = at_least(2, 128)  # accepted values the statistics use
    sigma: float = at_least(0, 6.0)  # 0: z-score rule off
    min_ratio: float = at_least(0, 1.0)  # the z-score rule also needs value >= min_ratio x window mean
    max_ratio: float = at_least(0, 0.0)  # the "k x recent maximum" rule; 0: off
    response: Optional[Response] = None  # null: monitor.response


@dataclass
class NonfiniteConfig:
    response: NonfiniteResponse = NonfiniteResponse.skip_step


@dataclass
class InjectConfig:
    """Testing aid: perturb steps on purpose to exercise detection and the responses."""

    step: Optional[int] = at_least(1, None)  # a step to perturb (1-based, as logged); null: off
    steps: List[int] = at_least(1, [])  # more steps to perturb (a scripted burst), each once per process
    kind: InjectKind = InjectKind.loss  # loss: x scale | nan_loss | poison: a batch of one repeated token
    scale: float = finite(50.0)  # kind=loss: the loss multiplier


@dataclass
class EscalateConfig:
    """monitor.response=escalate, a ladder of responses to repeated spikes: skip the update; after `skips` skipped
    firings, cut the learning rate by `lr_factor` for `cooldown` steps; a firing during the cut rolls back to the
    newest verified checkpoint and skips `rollback_skip_batches` global batches (PaLM skipped 200-500); after
    `max_rollbacks` rollbacks, a firing aborts the run (exit status 3). Firings more than `window` steps apart
    start the ladder again at its first rung."""

    skips: int = at_least(0, 2)
    lr_factor: float = between(0, 1, 0.5, lo_open=True, hi_open=True)
    cooldown: int = at_least(1, 100)
    rollback_skip_batches: int = at_least(0, 200)
    max_rollbacks: int = at_least(0, 3)
    window: int = at_least(1, 200)


@dataclass
class MonitorConfig:
    name: str = "default"  # the option's name (logged, W&B tags)
    gain_interval: int = at_least(0, 25)  # signal-gain diagnostics every N steps (gain/* metrics); 0: off
    response: Response = Response.skip_step  # default response to a spike (escalate: the ladder below)
    style: DetectorStyle = DetectorStyle.stabletrain  # the detection rule (docs/spikes.md compares both)
    warmup_steps: int = at_least(0, 64)  # detectors fire only after this many accepted steps (OLMo-core: 64)
    loss: DetectorConfig = field(default_factory=DetectorConfig)
    grad_norm: DetectorConfig = field(default_factory=lambda: DetectorConfig(min_ratio=3.0, max_ratio=10.0))
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    rollback_skip_batches: int = at_least(0, 4)  # global batches skipped after a rollback, ending with the spike's
    max_rollbacks: int = at_least(0, 3)  # more rollbacks than this within rollback_window steps: stop instead
    rollback_window: int = at_least(1, 1000)  # steps over which rollbacks are counted
    forensics: bool = True  # write <run_dir>/spikes/<step>/ on every spike and non-finite step
    alert_interval_s: float = at_least(0, 300.0)  # at most one W&B alert of a kind per this many seconds
    inject: InjectConfig = field(default_factory=InjectConfig)
    escalate: EscalateConfig = field(default_factory=EscalateConfig)
