"""Disk space and failed writes: a checkpoint that does not fit is one line, not two chained tracebacks.

    low_space(root)        before a save: whether the free space is below twice the newest checkpoint's size
    write_failure(...)     a failed write (OSError, or torch's RuntimeError from a write that stopped mid-file) as
                           DiskFull (exit status 28, as errno ENOSPC) or CheckpointWriteFailed (74, as EX_IOERR)

torch's zip writer reports a write that ran out of space as `[enforce fail at inline_container.cc] unexpected pos
...` without an errno, so a RuntimeError counts as a full disk when the free space left is below what the checkpoint
needs (or below FULL_BYTES).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from stabletrain import StableTrainError

NO_SPACE_STATUS = 28  # errno ENOSPC
IO_ERROR_STATUS = 74  # sysexits EX_IOERR
FULL_BYTES = 16 << 20  # less free space than this after a failed write: the disk filled up
_WRITE_ERRORS = ("unexpected pos", "file write failed", "No space left", "Disk quota")


class DiskFull(StableTrainError):
    exit_status = NO_SPACE_STATUS


class CheckpointWriteFailed(StableTrainError):
    exit_status = IO_ERROR_STATUS


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem of path, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def manifest_bytes(tag_dir: Path) -> int | None:
    """The total size a checkpoint's manifest records (None: no readable manifest)."""
    try:
        files = json.loads((tag_dir / "COMPLETE.json").read_text())["files"]
        return sum(int(e["bytes"]) if isinstance(e, dict) else int(e) for e in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def low_space(root: Path, newest: tuple[str, int] | None, step: int) -> dict | None:
    """Event fields and a message when the free space under root is below twice the size of the newest checkpoint
    (`newest`: its tag and bytes): the save of `step` or, since pruning frees space only after a save, the next one
    may not fit."""
    if newest is None:
        return None
    tag, size = newest
    free = free_bytes(root)
    if free >= 2 * size:
        return None
    outlook = "this save will not fit" if free < size else "the next one may not"
    message = (
        f"low disk space in {root} before the checkpoint of step {step}: {human(free)} free, and a checkpoint takes "
        f"{human(size)} ({tag}): {outlook}"
    )
    return {"free_bytes": free, "checkpoint_bytes": size, "message": message}


def is_write_error(exc: BaseException) -> bool:
    """An OSError, or torch's RuntimeError for a write that failed (other RuntimeErrors are bugs: not caught)."""
    return isinstance(exc, OSError) or any(s in str(exc) for s in _WRITE_ERRORS)


def is_no_space(exc: BaseException, root: Path, needed: int | None) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return is_write_error(exc) and free_bytes(root) < max(needed or 0, FULL_BYTES)


def write_failure(
    exc: BaseException, root: Path, step: int, needed: int | None, intact: str | None, written: int
) -> StableTrainError:
    """The one-line error for a checkpoint write that failed; called before the caller removes the partial tag.
    `needed`: the newest checkpoint's size (None: none yet), `intact`: the newest intact checkpoint, `written`: the
    bytes of the partial checkpoint."""
    tag = f"step_{step:08d}"
    keep = f"{intact} stays intact" if intact else "no earlier checkpoint exists"
    if is_no_space(exc, root, needed):
        size = (
            f"it needs about {needed:,} bytes ({human(needed)}, the size of the last checkpoint)"
            if needed
            else f"it needs more than the {written:,} bytes written before the disk filled"
        )
        return DiskFull(
            f"no space left on the device: the checkpoint of step {step} did not fit in {root} ({size}); removed "
            f"the partial {tag}; {keep}: free space, then continue with trainer.resume=auto"
        )
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return CheckpointWriteFailed(
        f"writing the checkpoint of step {step} to {root} failed ({type(exc).__name__}: {first}); removed the partial "
        f"{tag}; {keep}"
    )
