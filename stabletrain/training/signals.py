"""Stopping on a signal: SIGTERM (a scheduler's preemption), SIGUSR1 (SLURM's warning before the time limit or a
preemption, `--signal=USR1@<seconds>`) and SIGINT (Ctrl-C) ask the run to stop at the end of the current step,
after a checkpoint; a second Ctrl-C aborts at once (KeyboardInterrupt). A file PREEMPT_FILE in the run directory
does what SIGUSR1 does, for launchers whose agents stand between the scheduler's signal and the ranks (a batch
script traps the signal and creates it)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

from stabletrain.distributed import STOP_SIGNALS

PREEMPT_FILE = "PREEMPT"


class StopSignals:
    SIGNALS = STOP_SIGNALS

    def __init__(self, say: Callable[[str], None], preempt_file: Path | None = None):
        self.say = say
        self.preempt_file = preempt_file  # watched on rank 0 only: the all-reduce of the stop flags tells the others
        self.requested: int | None = None  # the first signal received
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def poll(self) -> int | None:
        """The stop requested so far; the preemption file counts as SIGUSR1 (the batch script's word for it)."""
        if self.requested is None and self.preempt_file is not None and self.preempt_file.exists():
            self.requested = signal.SIGUSR1
        return self.requested

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            self.say(
                f"{signal.Signals(signum).name}: finishing the current step, then a checkpoint and stop"
                + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT else "")
            )
