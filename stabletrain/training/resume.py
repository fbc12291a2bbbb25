"""Which checkpoint `trainer.resume` names, and the events its choice leaves.

auto                       the newest intact checkpoint of this run; damaged ones are skipped, each with a
                           `checkpoint_rejected` event. A run directory without checkpoint directories starts fresh
                           (said in one line). One whose checkpoint directories are all unusable is an error (a fresh
                           start would overwrite them), except when every one is an interrupted save (the run died
                           during its first save): they hold nothing to resume from, so they are removed and the run
                           starts fresh
a step_* directory         exactly that checkpoint, or a one-line error
a directory of checkpoints its newest intact one, or an error

Integrity fails closed: a manifest without a digest for every file rejects its checkpoint, unless
trainer.accept_legacy_checkpoints=true (then it is used with a warning and a `checkpoint_legacy` event).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from stabletrain import StableTrainError, checkpoint
from stabletrain import distributed as dist_utils
from stabletrain.checkpoint import Rejection

Events = list[tuple[str, dict]]


def resume(
    mode: str,
    run_dir: Path,
    load: Callable[[Path], Rejection | None],
    say: Callable[[str], None],
    accept_legacy: bool = False,
) -> Events:
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
        rejection = checkpoint.verify(tag_dir, accept_legacy) or load(tag_dir)
        if rejection is None:
            say(f"resumed from {tag_dir}")
            skipped = [[d.name, str(r)] for d, r in zip(tags, rejected)]
            return events + _legacy(tag_dir, say) + [("resume", {"checkpoint": str(tag_dir), "rejected": skipped})]
        if exact:
            raise StableTrainError(f"trainer.resume={tag_dir}: {rejection}")
        say(f"resume: skipping checkpoint {tag_dir.name}: {rejection}")
        events.append(
            ("checkpoint_rejected", {"checkpoint": str(tag_dir), "file": rejection.file, "reason": rejection.reason})
        )
        rejected.append(rejection)
    return events + _nothing_usable(mode, path, tags, rejected, say)


def _legacy(tag_dir: Path, say: Callable[[str], None]) -> Events:
    if not checkpoint.legacy(tag_dir):
        return []
    say(
        f"warning: {tag_dir.name} has a manifest without digests (an older stabletrain's): used because "
        "trainer.accept_legacy_checkpoints=true, but the content of its files is not checked"
    )
    return [("checkpoint_legacy", {"checkpoint": str(tag_dir)})]


def _nothing_usable(
    mode: str, path: Path, tags: list[Path], rejected: list[Rejection], say: Callable[[str], None]
) -> Events:
    """No checkpoint could be used: a fresh start where nothing would be lost by one, else an error."""
    listing = "; ".join(f"{d.name}: {r}" for d, r in zip(tags, rejected))
    if any(r.partial for r in rejected) or (mode == "auto" and not all(r.interrupted for r in rejected)):
        # A failed load may have left half-restored state behind, and a fresh start would overwrite checkpoints
        # someone may want to inspect or repair (a lost manifest is damage, not an empty run): stop instead.
        raise StableTrainError(
            f"no checkpoint in {path} could be loaded ({listing}); a fresh start would overwrite them: repair or "
            "move them away, or choose another hydra.run.dir"
        )
    if mode != "auto":
        raise StableTrainError(f"trainer.resume={mode}: no intact checkpoint ({listing})")
    if tags:  # only interrupted saves: the run was killed while writing its first checkpoint
        if dist_utils.rank() == 0:
            for tag_dir in tags:
                shutil.rmtree(tag_dir, ignore_errors=True)
        names = ", ".join(d.name for d in tags)
        say(
            f"resume=auto: {path} holds only the interrupted first save {names} (nothing to resume from); removed "
            "it, starting fresh"
        )
    else:
        say(f"resume=auto: no checkpoint in {path}; starting fresh")
    return [("resume", {"checkpoint": None, "rejected": [[d.name, str(r)] for d, r in zip(tags, rejected)]})]
