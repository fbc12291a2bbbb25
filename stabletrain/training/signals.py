"""Stopping on a signal: SIGTERM (a scheduler's preemption), SIGUSR1 (SLURM's warning before the time limit or a
preemption, `--signal=USR1@<seconds>`) and SIGINT (Ctrl-C) ask the run to stop at the end of the current step,
after a checkpoint; a second Ctrl-C aborts at once (KeyboardInterrupt). A file PREEMPT_FILE in the run directory
does what SIGUSR1 does, for launchers whose agents stand between the scheduler's signal and the ranks (a batch
script traps the signal and creates it)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

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


def pack_with_stop_flags(local_mean: torch.Tensor, requested: int | None, world: int) -> torch.Tensor:
    """[mean loss over ranks, one flag per stop signal]: the loss's all-reduce carries any rank's stop signal. Left
    on the device: the step reads it together with the gradient norm, in one host sync (read_step)."""
    flags = [float(requested == s) for s in STOP_SIGNALS]
    packed = torch.cat([local_mean.reshape(1).float(), torch.tensor(flags, device=local_mean.device)])
    if world > 1:
        dist.all_reduce(packed)
        packed[0] /= world
    return packed


def read_step(packed: torch.Tensor, grad_norm) -> tuple[float, float | None, int | None]:
    """The step's one host read: (loss, gradient norm, the stop signal any rank got; SIGINT wins over SIGTERM)."""
    norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=packed.device)
    loss, *flags, norm = torch.cat([packed, norm.float().reshape(1)]).tolist()
    stop = next((s for s, flag in zip(STOP_SIGNALS, flags) if flag > 0), None)
    return loss, None if grad_norm is None else norm, stop
