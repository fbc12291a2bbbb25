"""Stopping on a signal: SIGTERM (a scheduler's preemption), SIGUSR1 (SLURM's warning before the time limit or a
preemption, `--signal=USR1@<seconds>`) and SIGINT (Ctrl-C) ask the run to stop at the end of the current step,
after a checkpoint; a second Ctrl-C aborts at once (KeyboardInterrupt). A file PREEMPT_FILE in the run directory
does what SIGUSR1 does, for launchers whose agents stand between the scheduler's signal and the ranks (a batch
script traps the signal and creates it)."""

from __future__ import annotations

import signal
from typing import Callable

PREEMPT_FILE = "PREEMPT"


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.requested: int | None = None  # the first signal received
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            self.say(
                f"{signal.Signals(signum).name}: finishing the current step, then a checkpoint and stop"
                + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT else "")
            )
