"""Checkpoints through DeepSpeed's own save/load, plus what DeepSpeed does not keep: RNG states of every rank,
per-rank state, and a manifest that proves the checkpoint complete and intact.

    <run_dir>/checkpoints/step_00000100/   DeepSpeed files, rng_rank<r>.pt, state_rank<r>.pt (per-rank state
                                           such as expert-parallel experts), COMPLETE.json (written last)
    <run_dir>/checkpoints/latest           DeepSpeed's pointer to the newest tag

COMPLETE.json lists every file with its size and xxh3-128 digest (xxh3: 0.25 s/GB against sha256's 1.0 s/GB on
the reference CPU, docs/BENCHMARKS.md; the digest guards against corruption, not against an attacker, whom the
weights-only loading below stops). Ranks hash and verify disjoint shares of the files in parallel. Integrity fails
closed: a manifest without a digest for every file (the size-only form of older versions) rejects the checkpoint
unless the caller accepts legacy checkpoints. While a save is under way its tag holds SAVE_MARKER, so that an
interrupted save (marker, no manifest) is told apart from a checkpoint whose manifest was lost (no marker either).

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
from stabletrain.checkpoint import safe_load, space

MANIFEST = "COMPLETE.json"
SAVE_MARKER = "SAVE_IN_PROGRESS"  # present from the start of a save until its manifest is written
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
    interrupted: bool = False  # a save that never finished (marker, no manifest): not a damaged checkpoint
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


def _my_share(sizes: dict[str, int], collective: bool = True) -> list[str]:
    """This rank's files: largest first, each to the least-loaded rank (the same answer on every rank); all of them
    when not collective."""
    world, rank = (dist_utils.world_size(), dist_utils.rank()) if collective else (1, 0)
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
def save(
    engine,
    root: Path,
    step: int,
    client_state: dict,
    keep: int,
    rank_state: dict | None = None,
    layout: dict | None = None,
    writer=None,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes the manifest after all ranks finished writing and hashing.
    `rank_state` is this rank's own state that DeepSpeed does not save (e.g. its expert-parallel experts);
    `layout` (ranks, pipeline stages, ZeRO stage, ...) goes into the manifest, readable before any loading.
    A write that fails (a full disk) removes the partial tag and raises one line (checkpoint.space); the rank
    that fails raises at once (under torchrun its exit stops the others). With a background `writer`
    (checkpoint.background), the files are handed over as host copies and the manifest comes later
    (background.complete)."""
    tag_dir, rank = root / tag_for(step), dist_utils.rank()
    newest = newest_complete(root)
    try:
        if rank == 0:  # a tag of this step from an interrupted save or an abandoned timeline goes first
            shutil.rmtree(tag_dir, ignore_errors=True)
            tag_dir.mkdir(parents=True)
            (tag_dir / SAVE_MARKER).write_text(f"step {step}\n")
        dist_utils.barrier()
        engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state)
        own = {f"rng_rank{rank}.pt": rng_state(), **({f"state_rank{rank}.pt": rank_state} if rank_state else {})}
        if writer is not None:
            for name, state in own.items():
                writer.put(tag_dir / name, state)
            writer.finish(tag_dir)
            return tag_dir
        for name, state in own.items():
            torch.save(state, tag_dir / name)
        dist_utils.barrier()
        _write_manifest(tag_dir, step, layout)
    except (OSError, RuntimeError) as e:
        if not space.is_write_error(e):
            raise
        error = space.write_failure(e, root, step, newest and newest[1], newest and newest[0], space.dir_bytes(tag_dir))
        shutil.rmtree(tag_dir, ignore_errors=True)
        raise error from None
    if rank == 0:
        prune(root, keep)
    dist_utils.barrier()
    return tag_dir


def _write_manifest(tag_dir: Path, step: int, layout: dict | None) -> None:
    """Collective: every rank hashes its share of the files; rank 0 writes the manifest, then drops the marker."""
    sizes = {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, SAVE_MARKER)
    }
    mine = {rel: {"bytes": sizes[rel], DIGEST: file_digest(tag_dir / rel)} for rel in _my_share(sizes)}
    files = {rel: entry for part in _gather(mine) for rel, entry in part.items()}
    if dist_utils.rank() == 0:
        write_manifest(tag_dir, step, layout, files)


def write_manifest(tag_dir: Path, step: int, layout: dict | None, files: dict) -> None:
    """COMPLETE.json, written atomically and last (the checkpoint is complete from here on); the marker goes."""
    manifest = {
        "step": step,
        "world_size": dist_utils.world_size(),
        "layout": layout,
        "digest": DIGEST,
        "files": dict(sorted(files.items())),
    }
    (tag_dir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    (tag_dir / (MANIFEST + ".tmp")).rename(tag_dir / MANIFEST)
    (tag_dir / SAVE_MARKER).unlink(missing_ok=True)


def newest_complete(root: Path) -> tuple[str, int] | None:
    """The newest structurally complete checkpoint under root and the bytes its manifest records."""
    for tag_dir in tags_newest_first(root):
        if check(tag_dir) is None:
            return tag_dir.name, space.manifest_bytes(tag_dir) or 0
    return None


def prune(root: Path, keep: int) -> None:
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


def _manifest_files(tag_dir: Path, accept_legacy: bool = False) -> tuple[dict | None, Rejection | None]:
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        if (tag_dir / SAVE_MARKER).is_file():
            return None, Rejection(None, "the save of this checkpoint was interrupted (no manifest)", interrupted=True)
        return None, Rejection(
            None,
            "no completeness manifest (COMPLETE.json is missing and no save was under way: it was deleted or lost)",
        )
    try:
        recorded = json.loads(manifest.read_text())
        # Manifests written before digests existed list sizes only.
        files = {rel: e if isinstance(e, dict) else {"bytes": int(e)} for rel, e in recorded["files"].items()}
        for entry in files.values():
            int(entry["bytes"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, Rejection(MANIFEST, f"unreadable manifest ({type(e).__name__}: {e})")
    if not accept_legacy and (why := _undigested(recorded, files)):
        return None, Rejection(MANIFEST, why)
    return files, None


def _undigested(recorded: dict, files: dict) -> str | None:
    """Why the manifest cannot vouch for every file's content (None: it can): integrity fails closed."""
    accept = "; accept_legacy_checkpoints=true (trainer.accept_legacy_checkpoints=true in training) uses it anyway"
    if recorded.get("digest", DIGEST) != DIGEST:
        return f"the manifest's digests are {recorded['digest']!r}, not {DIGEST}: the files cannot be checked{accept}"
    missing = sorted(rel for rel, e in files.items() if not isinstance(e.get(DIGEST), str))
    if missing:
        return (
            f"the manifest records no {DIGEST} digest for {missing[0]}"
            + (f" and {len(missing) - 1} more file(s)" if len(missing) > 1 else "")
            + f" (a size-only manifest of an older stabletrain): the content cannot be checked{accept}"
        )
    return None


def legacy(tag_dir: Path) -> bool:
    """Whether the checkpoint's manifest is readable but lacks digests (usable only when legacy is accepted)."""
    return _manifest_files(tag_dir)[0] is None and _manifest_files(tag_dir, accept_legacy=True)[0] is not None


def layout_of(tag_dir: Path) -> dict | None:
    """The layout recorded in a checkpoint's manifest (None: not recorded, or no readable manifest)."""
    try:
        return json.loads((tag_dir / MANIFEST).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None


def check(tag_dir: Path, accept_legacy: bool = False) -> Rejection | None:
    """Cheap structural check (manifest present with a digest for every file, every file there with its recorded
    size); None when it passes."""
    files, rejection = _manifest_files(tag_dir, accept_legacy)
    if rejection:
        return rejection
    for rel, entry in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return Rejection(rel, "missing file")
        if path.stat().st_size != entry["bytes"]:
            return Rejection(rel, f"truncated or resized file ({path.stat().st_size} of {entry['bytes']} bytes)")
    return None


def verify(tag_dir: Path, accept_legacy: bool = False, collective: bool = True) -> Rejection | None:
    """The structural check, then every file's digest and a scan of every .pt file for code it would run. Collective
    (the files shared out over the ranks, the same answer on every rank) unless `collective` is False (one process
    checks everything, e.g. rank 0 alone). None when the checkpoint is intact and safe."""
    rejection = check(tag_dir, accept_legacy)
    if rejection is None:
        files, _ = _manifest_files(tag_dir, accept_legacy)
        found = []
        for rel in _my_share({rel: e["bytes"] for rel, e in files.items()}, collective):
            expected = files[rel].get(DIGEST)
            if expected is not None and file_digest(tag_dir / rel) != expected:
                found.append((rel, f"checksum mismatch ({DIGEST} differs from the manifest: the file is corrupt)"))
            elif rel.endswith(".pt") and (why := safe_load.refusal(tag_dir / rel)):
                found.append((rel, why))
        problems = [p for part in _gather(found) for p in part] if collective else found
        if problems:
            rel, why = min(problems)
            rejection = Rejection(rel, why)
    return rejection


def candidates(root: Path, accept_legacy: bool = False) -> list[tuple[Path, Rejection | None]]:
    """Every checkpoint under root, newest first, with its structural rejection (None when it looks complete)."""
    return [(tag_dir, check(tag_dir, accept_legacy)) for tag_dir in tags_newest_first(root)]


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
