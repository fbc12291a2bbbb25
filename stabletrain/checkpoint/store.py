"""Checkpoints through DeepSpeed's own save/load, plus what DeepSpeed does not keep: RNG states of every rank,
per-rank state, and a manifest that proves the checkpoint complete and intact.

    <run_dir>/checkpoints/step_00000100/   DeepSpeed files, rng_rank<r>.pt, state_rank<r>.pt (per-rank state
                                           such as expert-parallel experts), COMPLETE.json (written last)
    <run_dir>/checkpoints/latest           DeepSpeed's pointer to the newest tag

COMPLETE.json lists every file with its size and xxh3-128 digest (xxh3: 0.25 s/GB against sha256's 1.0 s/GB on
the reference CPU, docs/BENCHMARKS.md; the digest guards against corruption, not against an attacker, whom the
weights-only loading below stops). Ranks hash and verify disjoint shares of the files in parallel.

Nothing is loaded by unpickling arbitrary objects: files are scanned for the globals their pickles import before
anything is read (stabletrain.checkpoint.safe_load.refusal), and every load runs with weights_only=True.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from stabletrain import distributed as dist_utils
from stabletrain.checkpoint import safe_load

MANIFEST = "COMPLETE.json"
DIGEST = "xxh3_128"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(TAG_RE.match(tag_dir.name).group(1))


@dataclass
class Rejection:
    """Why a checkpoint cannot be used: the file at fault (None: the checkpoint as a whole) and the reason."""

    file: str | None
    reason: str
    interrupted: bool = False  # a save that never finished (no manifest): not a damaged checkpoint
    partial: bool = False  # loading failed midway: the engine may hold half-restored state

    def __str__(self) -> str:
        return self.reason if self.file is None or self.reason.startswith(self.file) else f"{self.file}: {self.reason}"


# ---------------------------------------------------------------- RNG, as tensors and plain types only
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- digests, shared out over the ranks
def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files: largest first, each to the least-loaded rank (the same answer on every rank)."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    load, owner = [0] * world, {}
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        r = min(range(world), key=load.__getitem__)
        owner[rel], load[r] = r, load[r] + sizes[rel]
    return [rel for rel, r in owner.items() if r == rank]


def _gather(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ---------------------------------------------------------------- save
def save(engine, root: Path, step: int, client_state: dict, keep: int, rank_state: dict | None = None,
         layout: dict | None = None) -> Path:  # fmt: skip
    """Collective: every rank calls it. Rank 0 writes the manifest after all ranks finished writing and hashing.
    `rank_state` is this rank's own state that DeepSpeed does not save (e.g. its expert-parallel experts);
    `layout` (ranks, pipeline stages, ZeRO stage, ...) goes into the manifest, readable before any loading."""
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    tag_dir = root / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{dist_utils.rank()}.pt")
    if rank_state:
        torch.save(rank_state, tag_dir / f"state_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()
    sizes = {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    mine = {rel: {"bytes": sizes[rel], DIGEST: file_digest(tag_dir / rel)} for rel in _my_share(sizes)}
    files = {rel: entry for part in _gather(mine) for rel, entry in part.items()}
    if dist_utils.rank() == 0:
        manifest = {
            "step": step,
            "world_size": dist_utils.world_size(),
            "layout": layout,
            "digest": DIGEST,
            "files": dict(sorted(files.items())),
        }
        (tag_dir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
        (tag_dir / (MANIFEST + ".tmp")).rename(tag_dir / MANIFEST)
        _prune(root, keep)
    dist_utils.barrier()
    return tag_dir


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = [d for d in tags_newest_first(root) if check(d) is None]
    for d in complete[keep:]:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- listing and verification
def tags_newest_first(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and TAG_RE.match(d.name)), key=step_of, reverse=True)


def _manifest_files(tag_dir: Path) -> tuple[dict | None, Rejection | None]:
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None, Rejection(None, "no completeness manifest (the save was interrupted)", interrupted=True)
    try:
        files = json.loads(manifest.read_text())["files"]
        # Manifests written before digests existed list sizes only.
        return {rel: e if isinstance(e, dict) else {"bytes": int(e)} for rel, e in files.items()}, None
    except (ValueError, KeyError, TypeError) as e:
        return None, Rejection(MANIFEST, f"unreadable manifest ({type(e).__name__}: {e})")


def layout_of(tag_dir: Path) -> dict | None:
    """The layout recorded in a checkpoint's manifest (None: not recorded, or no readable manifest)."""
    try:
        return json.loads((tag_dir / MANIFEST).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None


def check(tag_dir: Path) -> Rejection | None:
    """Cheap structural check (manifest present, every file there with its recorded size); None when it passes."""
    files, rejection = _manifest_files(tag_dir)
    if rejection:
        return rejection
    for rel, entry in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return Rejection(rel, "missing file")
        if path.stat().st_size != entry["bytes"]:
            return Rejection(rel, f"truncated or resized file ({path.stat().st_size} of {entry['bytes']} bytes)")
    return None


def verify(tag_dir: Path) -> Rejection | None:
    """Collective: the structural check, then every file's digest and a scan of every .pt file for code it would
    run, shared out over the ranks. None when the checkpoint is intact and safe; the same answer on every rank."""
    rejection = check(tag_dir)
    if rejection is None:
        files, _ = _manifest_files(tag_dir)
        found = []
        for rel in _my_share({rel: e["bytes"] for rel, e in files.items()}):
            expected = files[rel].get(DIGEST)
            if expected is not None and file_digest(tag_dir / rel) != expected:
                found.append((rel, f"checksum mismatch ({DIGEST} differs from the manifest: the file is corrupt)"))
            elif rel.endswith(".pt") and (why := safe_load.refusal(tag_dir / rel)):
                found.append((rel, why))
        if not dist.is_initialized() or dist.get_world_size() == 1:
            problems = found
        else:
            problems = [p for part in _gather(found) for p in part]
        if problems:
            rel, why = min(problems)
            rejection = Rejection(rel, why)
    return rejection


def candidates(root: Path) -> list[tuple[Path, Rejection | None]]:
    """Every checkpoint under root, newest first, with its structural rejection (None when it looks complete)."""
    return [(tag_dir, check(tag_dir)) for tag_dir in tags_newest_first(root)]


# ---------------------------------------------------------------- load
def load(engine, tag_dir: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the client state.
    Raises on a checkpoint that cannot be read (the caller falls back to an older one)."""
    with safe_load.weights_only_loading():
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError("DeepSpeed found no loadable checkpoint")
    rng_file = tag_dir / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded state
        set_rng_state(safe_load.load(rng_file))
    return client_state or {}


def load_rank_state(tag_dir: Path) -> dict:
    path = tag_dir / f"state_rank{dist_utils.rank()}.pt"
    if not path.is_file():
        raise RuntimeError(f"{path.name} is missing (saved on fewer ranks, or without expert parallelism)")
    return safe_load.load(path)


def model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint of any layout, read safely, under the unsharded model's names:

    - ZeRO-0/1/2: the module state DeepSpeed saved from rank 0 (bf16 runs on ZeRO-1/2: the fp32 master weights,
      consolidated by DeepSpeed's zero_to_fp32); ZeRO-3: zero_to_fp32 over every rank's shards;
    - pipeline stages: each layer file of DeepSpeed's layer list, renamed from the layer's blocks to the model's;
    - expert parallelism: every rank's own experts (fp32 masters) from its state_rank<r>.pt.
    zero_to_fp32 runs under forced weights-only loading."""
    layout = layout_of(tag_dir) or {}
    if layout.get("pipeline_stages", 1) > 1:
        weights = _pipeline_weights(tag_dir, layout["pipeline_layers"])
    else:
        states = sorted(tag_dir.glob("*model_states.pt"))
        masters = layout.get("dtype") == "bf16" and layout.get("zero_stage", 0) >= 1
        if states and states[0].name.startswith("mp_rank_") and not masters:
            module = safe_load.load(states[0], map_location="cpu")["module"]
            weights = {k: v.float() for k, v in module.items()}
        else:
            with safe_load.weights_only_loading():
                weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    for path in sorted(tag_dir.glob("state_rank*.pt")):  # expert-parallel ranks (replicas hold equal copies)
        experts = safe_load.load(path).get("local_experts")
        if experts:
            weights.update({k: v.float() for k, v in experts["params"].items()})
    return weights


def _pipeline_weights(tag_dir: Path, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Layer files layer_XX-model_states.pt back to model names ("blocks 4-5": its blocks.0 is the model's 4)."""
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(layer_names):
        if name == "tied embedding":
            continue  # the first layer's embedding, used again by the last stage
        path = tag_dir / f"layer_{i:02d}-model_states.pt"
        for key, value in safe_load.load(path, map_location="cpu").items():
            if name.startswith("blocks "):
                first = int(name.split()[1].split("-")[0])
                _, j, rest = key.split(".", 2)
                key = f"blocks.{first + int(j)}.{rest}"
            out[key] = value.float()
    if "tied embedding" in layer_names:
        out["head.weight"] = out["embed.weight"]
    return out
