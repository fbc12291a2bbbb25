"""Reading checkpoint files without executing code.

A `.pt` file is a pickle, and unpickling can call any function the file names: a checkpoint from a shared run
directory or a download would otherwise be remote code execution. Every file is therefore loaded with
`torch.load(weights_only=True)`, which rebuilds only tensors, plain containers and numbers, plus the three
DeepSpeed types its optimizer checkpoints hold (an enum, a dataclass of two ints, the loss-scaler record).

    refusal(path)              the globals a file would import beyond that allowlist (read from the pickle
                               without running it), or None: the check before anything is loaded
    load(path)                 torch.load with weights_only=True; an UnsafeCheckpoint names the file
    weights_only_loading()     a context in which every torch.load (DeepSpeed's own, zero_to_fp32's) is forced
                               to weights_only=True
    SafeCheckpointEngine       DeepSpeed's torch checkpoint engine with that load; `install(engine)` puts it in
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from stabletrain import StableTrainError

# What DeepSpeed's ZeRO/bf16 optimizer checkpoints pickle besides tensors (found by scanning every stage x dtype).
ALLOWED = [ZeroStageEnum, fragment_address, LossScaler]
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(StableTrainError):
    """A checkpoint file that would run code (or build objects other than tensors and plain data) when loaded."""


def refusal(path: Path) -> str | None:
    """Why `path` must not be loaded (the globals its pickle imports beyond the allowlist), or None."""
    try:
        with torch.serialization.safe_globals(ALLOWED):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip archive torch wrote: nothing we can vouch for
        return f"{path.name} is not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})"
    if unsafe:
        return (
            f"{path.name} would import {', '.join(sorted(unsafe))} when loaded (a checkpoint holds tensors and "
            "plain data only); refusing it"
        )
    return None


def load(path: str | os.PathLike, map_location=None):
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{Path(path).name}: refused by the weights-only loader ({_first_line(e)})") from None


@contextmanager
def weights_only_loading():
    """Force weights_only=True on every torch.load inside (also those that pass weights_only=False)."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(ALLOWED):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"refused by the weights-only loader ({_first_line(e)})") from None
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (its own passes weights_only=False)."""

    def load(self, path: str, map_location=None):
        return load(path, map_location)


def install(engine) -> None:
    """Give a DeepSpeed engine the safe checkpoint engine (saving is unchanged)."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise StableTrainError(
            f"engine.ds_config selects the {type(engine.checkpoint_engine).__name__} checkpoint "
            "engine; stabletrain loads checkpoints only through the torch engine (safe loading)"
        )
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # torch's message leads with advice; the line naming the global is what matters
        if "GLOBAL" in ln or "Unsupported" in ln or "not an allowed" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__
