"""Which checkpoint `trainer.resume` names, and the events its choice leaves.

auto                       the newest intact checkpoint of this run; damaged ones are skipped, each with a
                           `checkpoint_rejected` event; no checkpoint at all: a fresh start (said in one line);
                           only damaged ones: an error (a fresh start would overwrite them)
a step_* directory         exactly that checkpoint, or a one-line error
a directory of checkpoints its newest intact one, or an error
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stabletrain import StableTrainError, checkpoint
from stabletrain.checkpoint import Rejection

Events = list[tuple[str, dict]]


def resume(mode: str, run_dir: Path, load: Callable[[Path], Rejection | None], say: Callable[[str], None]) -> Events:
    """Verify and `load` the checkpoint `mode` names (collective: every rank calls it); the events to record."""
    own = run_dir / "checkpoints"
    if mode == "none":
        if checkpoint.tags_newest_first(own):
            # Training from scratch here would interleave two runs' metrics and prune the old checkpoints.
            raise StableTrainError(
                f"{run_dir} already holds checkpoints: pass trainer.resume=auto to continue that "
                "run, or choose another hydra.run.dir"
            )
        return []
    path = own if mode == "auto" else Path(mode)
    exact = checkpoint.TAG_RE.match(path.name) is not None
    tags = [path] if exact else checkpoint.tags_newest_first(path)
    events: Events = []
    rejected: list[Rejection] = []
    for tag_dir in tags:
        rejection = checkpoint.verify(tag_dir) or load(tag_dir)
        if rejection is None:
            say(f"resumed from {tag_dir}")
            return events + [
                ("resume", {"checkpoint": str(tag_dir), "rejected": [[d.name, str(r)] for d, r in zip(tags, rejected)]})
            ]
        if exact:
            raise StableTrainError(f"trainer.resume={tag_dir}: {rejection}")
        say(f"resume: skipping checkpoint {tag_dir.name}: {rejection}")
        events.append(
            ("checkpoint_rejected", {"checkpoint": str(tag_dir), "file": rejection.file, "reason": rejection.reason})
        )
        rejected.append(rejection)
    listing = "; ".join(f"{d.name}: {r}" for d, r in zip(tags, rejected))
    if any(r.partial for r in rejected) or (mode == "auto" and any(not r.interrupted for r in rejected)):
        # A failed load may have left half-restored state behind, and a fresh start would overwrite damaged
        # checkpoints someone may want to inspect or repair: stop instead.
        raise StableTrainError(f"no checkpoint in {path} could be loaded ({listing}); move them away to start fresh")
    if mode != "auto":
        raise StableTrainError(f"trainer.resume={mode}: no intact checkpoint ({listing})")
    say(f"resume=auto: no {'intact ' if tags else ''}checkpoint in {path}; starting fresh")
    return events + [("resume", {"checkpoint": None, "rejected": [[d.name, str(r)] for d, r in zip(tags, rejected)]})]
