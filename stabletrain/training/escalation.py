"""monitor.response=escalate: a ladder of responses to repeated spikes (docs/spikes.md).

    rung 1  skip the update                       the first `skips` firings
    rung 2  cut the learning rate                 the next firing: lr x lr_factor for `cooldown` steps (and that
                                                  update is skipped too)
    rung 3  roll back and skip data               a firing while the cut lasts: the newest verified checkpoint, then
                                                  at least `rollback_skip_batches` global batches from the restored
                                                  one on (through the spike's); the cut lasts `cooldown` steps more
    rung 4  abort                                 a firing during a cut after `max_rollbacks` rollbacks: exit 3

Firings more than `window` steps apart (with no cut in force) start again at rung 1. The ladder sees only the
global loss and gradient norm (all-reduced before the detectors run) and state every rank holds alike, so every rank
takes the same decision at the same step without a further collective.
"""

from __future__ import annotations

from stabletrain.config.monitor import EscalateConfig
from stabletrain.training.detectors import Action, Decision


class Ladder:
    def __init__(self, cfg: EscalateConfig):
        self.cfg = cfg
        self.skipped = 0  # firings skipped on rung 1 since the ladder last started
        self.last_firing: int | None = None
        self.cut_until = 0  # the learning-rate cut lasts through this step
        self.rollbacks = 0

    def decide(self, step: int, cause: str) -> Decision:
        c = self.cfg
        if self.last_firing is not None and step - self.last_firing > c.window and step > self.cut_until:
            self.skipped = 0  # a quiet spell: back to the first rung
        self.last_firing = step
        if step <= self.cut_until:
            if self.rollbacks >= c.max_rollbacks:
                return Decision(
                    Action.ABORT,
                    f"{cause} during a learning-rate cut after {self.rollbacks} rollback(s) "
                    "(monitor.escalate.max_rollbacks)",
                )
            return Decision(Action.ROLLBACK, f"{cause} during a learning-rate cut", at_least=c.rollback_skip_batches)
        if self.skipped < c.skips:
            self.skipped += 1
            return Decision(Action.SKIP, f"{cause} ({self.skipped} of {c.skips} skipped before a learning-rate cut)")
        self.skipped, self.cut_until = 0, step + c.cooldown
        return Decision(
            Action.LR_CUT, f"{cause} after {c.skips} skipped update(s)", lr_scale=c.lr_factor, until=self.cut_until
        )

    def rolled_back(self, restored_step: int) -> None:
        """After the rollback restored `restored_step`: the cut lasts `cooldown` steps from there."""
        self.rollbacks += 1
        self.skipped, self.cut_until = 0, restored_step + self.cfg.cooldown

    def lr_scale(self, step: int) -> float:
        return self.cfg.lr_factor if step <= self.cut_until else 1.0

    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "last_firing": self.last_firing,
            "cut_until": self.cut_until,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.last_firing = state["skipped"], state["last_firing"]
        self.cut_until, self.rollbacks = state["cut_until"], state["rollbacks"]
