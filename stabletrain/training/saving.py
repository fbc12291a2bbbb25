"""Writing a checkpoint from the trainer: a warning before a save that may not fit (a `disk_space_low` event and a
line), and a `checkpoint_failed` event when a write fails. The one-line error itself, the removal of the partial
tag and the exit status (28 for a full disk) come from stabletrain.checkpoint (store.save, space).

`Saver` makes the saves: synchronous, or with trainer.ckpt_async=true only the copy to host memory blocks the step
and a background writer does the rest (stabletrain.checkpoint.background); the save is completed (manifest,
retention) at a later step boundary. Metrics: ckpt/blocking_s (what the step waited), ckpt/save_s (start to
complete), ckpt/bytes (the checkpoint on disk), ckpt/load_s (a resume or a rollback)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from stabletrain import StableTrainError, checkpoint
from stabletrain import distributed as dist_utils
from stabletrain.checkpoint import background, space
from stabletrain.checkpoint.background import BackgroundWriter


def save_checkpoint(trainer, state: dict, writer: BackgroundWriter | None = None) -> Path:
    """Collective: the trainer's engine saves `state` at the trainer's step under <run_dir>/checkpoints."""
    root, step = trainer.run_dir / "checkpoints", trainer.step
    if trainer.is_main and (low := space.low_space(root, checkpoint.newest_complete(root), step)) is not None:
        trainer.event("disk_space_low", step, free_bytes=low["free_bytes"], checkpoint_bytes=low["checkpoint_bytes"])
        trainer.say(f"warning: {low['message']}")
    try:
        return trainer.engine.save(root, step, state, trainer.cfg.trainer.keep_checkpoints, writer)
    except (space.DiskFull, space.CheckpointWriteFailed) as e:
        with contextlib.suppress(OSError):  # the event file may sit on the disk that is full
            trainer.event("checkpoint_failed", step, reason=str(e))
        raise


class Saver:
    def __init__(self, trainer):
        self.t = trainer
        self.writer = BackgroundWriter(trainer.rank) if trainer.cfg.trainer.ckpt_async else None
        self.pending: tuple[Path, int, float] | None = None  # (tag, step, when it started) of the save in flight

    def save(self, state: dict) -> Path:
        self.wait()  # never two saves in flight
        t0, step = time.perf_counter(), self.t.step
        tag_dir = save_checkpoint(self.t, state, self.writer)
        row = {"step": step, "ckpt/blocking_s": time.perf_counter() - t0}
        if self.writer is None:
            row |= {"ckpt/save_s": row["ckpt/blocking_s"], "ckpt/bytes": space.manifest_bytes(tag_dir) or 0}
        else:
            self.pending = (tag_dir, step, t0)
        self.t.log(row)
        return tag_dir

    def poll(self) -> None:
        """Collective while a save is in flight: complete it once every rank's writer is done."""
        if self.pending is None:
            return
        done, failed = background.done_everywhere(self.writer, self.t.device)
        tag_dir, step, t0 = self.pending
        if failed:
            self.pending = None
            self._failed(tag_dir, step)
        if done:
            self.pending = None
            background.complete(tag_dir, step, self.t.engine.layout_record(), self.t.cfg.trainer.keep_checkpoints)
            self.t.log(
                {
                    "step": self.t.step,
                    "ckpt/save_s": time.perf_counter() - t0,
                    "ckpt/bytes": space.manifest_bytes(tag_dir) or 0,
                    "ckpt/completed_step": step,
                }
            )

    def wait(self) -> None:
        while self.pending is not None:
            self.poll()
            time.sleep(0.01 if self.pending else 0)

    def _failed(self, tag_dir: Path, step: int) -> None:
        error = self.writer.error or RuntimeError("a writer on another rank failed")
        if self.t.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist_utils.barrier()
        if space.is_write_error(error):
            raise space.write_failure(error, tag_dir.parent, step, None, None, 0) from None
        raise StableTrainError(f"the background write of checkpoint {tag_dir.name} failed: {error}")
