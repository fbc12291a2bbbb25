"""The spike component: detection, what to do about a firing, skip lists, the rollbacks' bookkeeping and fault
injection, behind a narrow interface to the loop. It decides; the loop acts (veto, save, restore, stop).

    guard.next_batch(index) -> index         the first global batch at or after `index` that no range skips
    guard.injection(step, batch) -> kind     monitor.inject (a testing aid); perturb_batches / perturb_loss apply it
    guard.judge(step, loss, grad_norm)       the detectors' StepResult (applied or vetoed)
    guard.decide(result, batch) -> Decision continue | skip | lr_cut | rollback (with the batches to skip) | stop
                                             | abort (monitor.response=escalate climbs a ladder: stabletrain.
                                             training.escalation)
    guard.record_rollback(...) -> skip       after the loop restored a checkpoint: the batches it skips
    guard.lr_scale(step)                     the learning-rate factor of an escalation's cut (1 otherwise)
    guard.state_dict() / load_state_dict()   detector windows, skip ranges, rollbacks, the ladder: in checkpoints
"""

from __future__ import annotations

import torch

from stabletrain.config import MonitorConfig
from stabletrain.training.detectors import Action, Decision, SkipList, SpikeMonitor, StepResult
from stabletrain.training.escalation import Ladder


class SpikeGuard:
    def __init__(self, cfg: MonitorConfig, skip_batches, vocab_size: int):
        self.cfg, self.vocab_size = cfg, vocab_size
        self.monitor = SpikeMonitor(cfg)
        self.skips = SkipList(skip_batches)
        self.rollbacks: list[int] = []  # steps at which a rollback happened (capped by monitor.max_rollbacks)
        self.ladder = Ladder(cfg.escalate)
        self._injected: set[int] = set()

    def next_batch(self, batch_index: int) -> int:
        return self.skips.next_allowed(batch_index)

    # ---------------------------------------------------------------- fault injection (a testing aid)
    def injection(self, step: int, batch_index: int) -> str | None:
        """`poison` is tied to the data (the batch of an uninterrupted run's step, so a rollback that skips it
        clears it); `loss`/`nan_loss` perturb the state once per process."""
        inj = self.cfg.inject
        steps = set(inj.steps) | ({inj.step} if inj.step is not None else set())
        if inj.kind == "poison":
            return "poison" if batch_index + 1 in steps else None
        if step in steps and step not in self._injected:
            self._injected.add(step)
            return inj.kind
        return None

    def perturb_batches(self, kind: str | None, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        if kind == "poison":  # one rare token repeated: a batch that spikes from any state
            return [torch.full_like(b, self.vocab_size - 1) for b in batches]
        return batches

    def perturb_loss(self, kind: str | None, loss: torch.Tensor) -> torch.Tensor:
        if kind == "loss":
            return loss * self.cfg.inject.scale
        if kind == "nan_loss":
            return loss * float("nan")
        return loss

    # ---------------------------------------------------------------- detection and response
    def judge(self, step: int, loss: float, grad_norm: float | None) -> StepResult:
        return self.monitor.judge(step, loss, grad_norm)

    def engine_skipped(self, step: int, loss: float, grad_norm: float | None) -> StepResult:
        """The engine dropped the update itself (its overflow check): judged, and never applied."""
        result = self.monitor.judge(step, loss, grad_norm)
        result.applied = False
        return result

    def decide(self, result: StepResult, batch_index: int) -> Decision:
        if not result.fired:
            if result.applied:
                return Decision(Action.CONTINUE)
            return Decision(Action.SKIP, "DeepSpeed skipped the update (non-finite gradients)")
        cause = result.firings[0].kind
        if result.response == "log":
            return Decision(Action.CONTINUE)
        if result.response == "skip_step":
            return Decision(Action.SKIP, cause)
        if result.response == "stop":
            return Decision(Action.STOP, "monitor response 'stop'")
        if result.response == "escalate":
            return self.ladder.decide(result.step, cause)
        m = self.cfg
        recent = [s for s in self.rollbacks if s > result.step - m.rollback_window]
        if len(recent) >= m.max_rollbacks:
            why = f"{len(recent)} rollbacks within {m.rollback_window} steps (monitor.max_rollbacks)"
            return Decision(Action.STOP, why)
        n = m.rollback_skip_batches
        return Decision(Action.ROLLBACK, cause, [max(0, batch_index - n + 1), batch_index + 1] if n else None)

    def firing_records(self, result: StepResult, batch_index: int) -> list[tuple[str, dict, str, str]]:
        """Per firing: (event kind, event fields, alert title, alert text)."""
        out = []
        for f in result.firings:
            fields = {"response": result.response, "batch": batch_index, **f.fields()}
            threshold = f" > {f.threshold:.4g}" if f.threshold is not None else ""
            text = f"step {result.step}: {f.metric}={f.value:.4g}{threshold} ({f.rule}); response: {result.response}"
            out.append((f.kind, fields, f"stabletrain: {f.kind} in {f.metric}", text))
        return out

    def stop_message(self, result: StepResult, decision: Decision, tag: str, batch_index: int) -> str:
        f = result.firings[0]
        return (
            f"stopped at step {result.step} by {decision.reason}: {f.kind} in {f.metric} ({f.value:.4g}); "
            f"checkpoint {tag} holds the weights before that update (continue with trainer.resume=auto, "
            f"optionally with trainer.skip_batches=[[{batch_index},{batch_index + 1}]])"
        )

    def window_mean(self, metric: str) -> float:
        """The mean of a detector's window of clean values (forensics compares with it)."""
        return self.monitor.detectors[metric].mean()

    def history(self) -> list[tuple]:
        """(step, loss, grad_norm, fired) of recent steps, for forensics' plot."""
        return list(self.monitor.history)

    def would_fire(self, metric: str, value: float) -> bool:
        """Whether a metric's detector would fire on `value` now (nothing is recorded)."""
        return self.monitor.detectors[metric].check(value) is not None

    def record_rollback(self, step: int, decision: Decision, restored: int, spike: int, now: int) -> list[int] | None:
        """After the loop restored the checkpoint of step `now` (global batch `restored`; the spike was at batch
        `spike`): the [start, end) batches to skip. An escalation skips at least its count from the restored batch
        on, through the spike's; the plain response the batches ending with the spike's."""
        skip = decision.skip
        if decision.at_least:
            skip = [restored, max(restored + decision.at_least, spike + 1)]
            self.ladder.rolled_back(now)
        if skip:
            self.skips.add(*skip)
        self.rollbacks.append(step)
        return skip

    def lr_scale(self, step: int) -> float:
        return self.ladder.lr_scale(step)

    # ---------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict:
        return {
            "spike_monitor": self.monitor.state_dict(),
            "skip_batches": self.skips.ranges,
            "rollbacks": self.rollbacks,
            "ladder": self.ladder.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Detector windows from the checkpoint; skip ranges and rollbacks merged with those already known (a
        rollback restores an older checkpoint but keeps the ranges it added)."""
        if "spike_monitor" in state:
            self.monitor.load_state_dict(state["spike_monitor"])
            self.skips.merge(state["skip_batches"])
            self.rollbacks = sorted(set(self.rollbacks) | set(state["rollbacks"]))
        if "ladder" in state and not self.rollbacks:  # a resume; a rollback keeps the ladder where it climbed to
            self.ladder.load_state_dict(state["ladder"])
