"""Carrying out a spike decision: the events and alerts of a firing, forensics, then the guard's decision: skip the
update (already vetoed), cut the learning rate, roll back to the newest verified checkpoint and skip the batches
around the spike, or stop (abort: the escalation ladder's last rung). The guard decides; this acts on the trainer."""

from __future__ import annotations

import torch

from stabletrain import StableTrainError, checkpoint
from stabletrain import distributed as dist_utils
from stabletrain.training.callbacks import SpikeContext
from stabletrain.training.detectors import Action, Decision, StepResult


class SpikeAbort(StableTrainError):
    """monitor.response=escalate ran out of rollbacks: exit status 3, distinct from a user error's 2."""

    exit_status = 3


class SpikeResponder:
    def __init__(self, trainer):
        self.t = trainer

    def respond(self, result: StepResult, batch_index: int, batches: list[torch.Tensor]) -> Action:
        """Record a firing (events, alerts, forensics) and carry out the guard's decision; returns its action."""
        t = self.t
        for kind, fields, title, text in t.guard.firing_records(result, batch_index):
            t.event(kind, result.step, **fields)
            t.hook("on_alert", title, text, t.cfg.monitor.alert_interval_s)
        if any(f.kind == "nonfinite" for f in result.firings):
            t.refuse_nonfinite_state()  # NaN weights (e.g. loaded ones): no step can recover, stop now
        if result.fired:
            self.forensics(result, batch_index, batches)
        decision = t.guard.decide(result, batch_index)
        if decision.action == Action.ROLLBACK and not self.rollback(result, decision, batch_index):
            decision = Decision(Action.SKIP, "rollback requested but no intact checkpoint")
        if decision.action == Action.SKIP:
            t.event("skip_step", result.step, reason=decision.reason)
        elif decision.action == Action.LR_CUT:
            t.event("lr_cut", result.step, reason=decision.reason, factor=decision.lr_scale, until=decision.until)
            t.say(
                f"step {result.step}: {decision.reason}; learning rate x{decision.lr_scale:g} through step "
                f"{decision.until}"
            )
        elif decision.action in (Action.STOP, Action.ABORT):
            t.save()  # the vetoed update never reached these weights
            t.event(decision.action, result.step, reason=decision.reason)
            message = t.guard.stop_message(result, decision, checkpoint.tag_for(t.step), batch_index)
            raise (SpikeAbort if decision.action == Action.ABORT else StableTrainError)(message)
        return decision.action

    def forensics(self, result: StepResult, batch_index: int, batches: list[torch.Tensor]) -> None:
        """Collective: every rank's rows of the step go to rank 0, whose forensics callback examines them."""
        t = self.t
        tokens = dist_utils.gather_rows(torch.cat(batches).to(t.device), t.engine.dp_group)
        positions = t.loader.batch_positions(batch_index)
        ctx = SpikeContext(
            result,
            batch_index,
            positions,
            [int(i) for i in t.data.order(positions)],
            tokens,
            t.engine.full_weights() if t.is_main else None,
            t.engine.adam_state() if t.is_main else None,
            t.run_dir / "checkpoints",
            t.guard.window_mean,
            t.guard.would_fire,
            t.guard.history(),
        )
        for report in filter(None, t.hook("on_spike", ctx)):
            t.event("forensics", result.step, report=str(report["path"]), cause=report["cause"])
            t.say(f"step {result.step}: {result.firings[0].kind} ({report['cause']}); forensics in {report['path']}")
        dist_utils.barrier()

    def rollback(self, result: StepResult, decision: Decision, batch_index: int) -> bool:
        """Restore the newest intact checkpoint and skip the data around the spike (PaLM's remedy)."""
        t = self.t
        t.saver.wait()  # a save in flight completes first: it may be the newest checkpoint
        for tag_dir, rejection in checkpoint.candidates(t.run_dir / "checkpoints"):
            rejection = rejection or checkpoint.verify(tag_dir)
            if rejection is not None:
                t.event(
                    "checkpoint_rejected",
                    result.step,
                    checkpoint=str(tag_dir),
                    file=rejection.file,
                    reason=rejection.reason,
                )
                continue
            if (rejection := t.load(tag_dir)) is not None:
                raise StableTrainError(f"rollback at step {result.step} could not load {tag_dir}: {rejection}")
            restored = t.loader.samples_consumed // t.loader.global_batch_size
            skip = t.guard.record_rollback(result.step, decision, restored, batch_index, t.step)
            t.hook("on_rewind", t.step)
            count = skip[1] - skip[0] if skip else 0
            t.event(
                "rollback",
                t.step,
                from_step=result.step,
                checkpoint=str(tag_dir),
                skip_batches=skip,
                batches_skipped=count,
            )
            t.log({"step": t.step, "ckpt/load_s": t.load_s})
            skipped = f"; skipping global batches {skip[0]}..{skip[1] - 1} ({count})" if skip else ""
            t.say(f"step {result.step}: rolled back to step {t.step} ({tag_dir.name}){skipped}")
            return True
        return False
