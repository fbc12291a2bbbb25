"""Checkpoints through DeepSpeed's own save/load, plus what DeepSpeed does not keep: RNG states of every rank
and a completeness manifest, so that a half-written checkpoint is never resumed from.

    <run_dir>/checkpoints/step_00000100/   DeepSpeed files, rng_rank<r>.pt, state_rank<r>.pt (per-rank state
                                           such as expert-parallel experts), COMPLETE.json (written last)
    <run_dir>/checkpoints/latest           DeepSpeed's pointer to the newest tag
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from stabletrain.engine import distributed as dist_utils

MANIFEST = "COMPLETE.json"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, keep: int, rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Rank 0 writes the manifest after all ranks finished writing.
    `rank_state` is this rank's own state that DeepSpeed does not save (e.g. its expert-parallel experts)."""
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    tag_dir = root / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{dist_utils.rank()}.pt")
    if rank_state:
        torch.save(rank_state, tag_dir / f"state_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()
    if dist_utils.rank() == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        manifest = {"step": step, "world_size": dist_utils.world_size(), "files": files}
        (tag_dir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
        (tag_dir / (MANIFEST + ".tmp")).rename(tag_dir / MANIFEST)
        _prune(root, keep)
    dist_utils.barrier()
    return tag_dir


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = [d for d in _tags_newest_first(root) if check(d) is None]
    for d in complete[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def _tags_newest_first(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    tags = [d for d in root.iterdir() if d.is_dir() and TAG_RE.match(d.name)]
    return sorted(tags, key=lambda d: int(TAG_RE.match(d.name).group(1)), reverse=True)


def check(tag_dir: Path) -> str | None:
    """None if the checkpoint is complete, else the reason it is not."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no completeness manifest (the save was interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest: {e}"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != size:
            return f"truncated file {rel} ({path.stat().st_size} of {size} bytes)"
    return None


def candidates(root: Path) -> list[tuple[Path, str | None]]:
    """Every checkpoint under root, newest first, with the reason it is incomplete (None when complete)."""
    return [(tag_dir, check(tag_dir)) for tag_dir in _tags_newest_first(root)]


def load(engine, tag_dir: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the client state.
    Raises on a checkpoint that cannot be read (the caller falls back to an older one)."""
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError("DeepSpeed found no loadable checkpoint")
    rng_file = tag_dir / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded state
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def load_rank_state(tag_dir: Path) -> dict:
    path = tag_dir / f"state_rank{dist_utils.rank()}.pt"
    if not path.is_file():
        raise RuntimeError(f"{path.name} is missing (saved on fewer ranks, or without expert parallelism)")
    return torch.load(path, weights_only=False)
