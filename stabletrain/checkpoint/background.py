"""Asynchronous checkpoints (`trainer.ckpt_async=true`): the step waits only while the state is copied to host
memory; a background thread per rank writes the files, fsyncs them and digests them; the manifest (COMPLETE.json)
is written after every rank's files are on disk, at a step boundary, so a checkpoint is never complete before its
bytes are durable.

    HostCopyEngine     DeepSpeed's (safe-loading) checkpoint engine whose save() hands a host copy of the state to
                       the writer instead of writing it (attach)
    BackgroundWriter   the thread: writes each file to <name>.tmp, fsyncs it, renames it; at the end of a tag,
                       digests its own files into DIGESTS.rank<r>.json (read by rank 0 for the manifest)

A process killed while the writer runs leaves the tag with its SAVE_IN_PROGRESS marker and no manifest: an
interrupted save, which resume skips for the newest complete checkpoint. Only one save is in flight at a time (the
next one waits for it), and retention deletes old checkpoints only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stabletrain import distributed as dist_utils
from stabletrain.checkpoint import store
from stabletrain.checkpoint.safe_load import SafeCheckpointEngine

DIGESTS = "DIGESTS.rank{}.json"
# Testing aid: seconds the writer sleeps before each file, so that a test can kill a process mid-write.
DELAY_ENV = "STABLETRAIN_CKPT_WRITE_DELAY_S"


def to_host(obj):
    """A copy of `obj` whose tensors live in host memory, detached from anything the next step may change."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundWriter:
    def __init__(self, rank: int):
        self.rank = rank
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pending = 0
        self.lock = threading.Lock()
        self.written: list[Path] = []
        self.copied_bytes = 0  # host copies made for the save in flight (ckpt/bytes)
        threading.Thread(target=self._run, name="stabletrain-checkpoint-writer", daemon=True).start()

    def put(self, path: str | Path, state) -> None:
        """Copy `state` to host memory now (the step may change it next); write it in the background."""
        host = to_host(state)
        self.copied_bytes += sum(t.numel() * t.element_size() for t in _tensors(host))
        self._submit(("file", Path(path), host))

    def finish(self, tag_dir: Path) -> None:
        """After this tag's files: digest them into DIGESTS.rank<r>.json (the last file written)."""
        self._submit(("finish", tag_dir, None))

    def _submit(self, job) -> None:
        with self.lock:
            self.pending += 1
        self.jobs.put(job)

    def idle(self) -> bool:
        with self.lock:
            return self.pending == 0

    def _run(self) -> None:
        while True:
            kind, path, state = self.jobs.get()
            try:
                if self.error is None:
                    self._file(path, state) if kind == "file" else self._finish(path)
            except BaseException as e:  # reported on the main thread at its next poll
                self.error = e
            finally:
                with self.lock:
                    self.pending -= 1

    def _file(self, path: Path, state) -> None:
        time.sleep(float(os.environ.get(DELAY_ENV, 0)))
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        self.written.append(path)

    def _finish(self, tag_dir: Path) -> None:
        mine = {
            str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "digest": store.file_digest(p)}
            for p in self.written
            if p.parent == tag_dir or tag_dir in p.parents
        }
        out = tag_dir / DIGESTS.format(self.rank)
        out.with_suffix(".tmp").write_text(json.dumps(mine))
        _fsync(out.with_suffix(".tmp"))
        os.replace(out.with_suffix(".tmp"), out)
        self.written = []


class HostCopyEngine(SafeCheckpointEngine):
    """Saves hand the state to the background writer (when one is attached; otherwise it writes, as DeepSpeed's)."""

    writer: BackgroundWriter | None = None

    def save(self, state_dict, path: str):
        if self.writer is None:
            return super().save(state_dict, path)
        self.writer.put(path, state_dict)


def attach(ds_engine, writer: BackgroundWriter | None) -> None:
    """Route a DeepSpeed engine's checkpoint writes (it holds the safe engine, safe_load.install) to `writer`."""
    ds_engine.checkpoint_engine.__class__ = HostCopyEngine
    ds_engine.checkpoint_engine.writer = writer


def done_everywhere(writer: BackgroundWriter, device) -> tuple[bool, bool]:
    """Collective: (has every rank's writer finished, did one fail)."""
    flags = torch.tensor([float(not writer.idle()), float(writer.error is not None)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags)
    busy, failed = flags.tolist()
    return busy == 0, failed > 0


def complete(tag_dir: Path, step: int, layout: dict | None, keep: int) -> None:
    """Collective, once every rank's writer finished the tag: rank 0 writes the manifest from the ranks' digests
    (digesting what DeepSpeed copied in synchronously, such as its recovery script), then drops the digests and the
    marker, then prunes older checkpoints; the other ranks wait for it."""
    if dist_utils.rank() == 0:
        files = {}
        for r in range(dist_utils.world_size()):
            part = tag_dir / DIGESTS.format(r)
            files.update(
                {
                    rel: {"bytes": e["bytes"], store.DIGEST: e["digest"]}
                    for rel, e in json.loads(part.read_text()).items()
                }
            )
        skip = {store.MANIFEST, store.SAVE_MARKER}
        for p in sorted(tag_dir.rglob("*")):
            rel = str(p.relative_to(tag_dir))
            if p.is_file() and rel not in files and p.name not in skip and not p.name.startswith("DIGESTS."):
                files[rel] = {"bytes": p.stat().st_size, store.DIGEST: store.file_digest(p)}
        store.write_manifest(tag_dir, step, layout, files)
        for r in range(dist_utils.world_size()):
            (tag_dir / DIGESTS.format(r)).unlink(missing_ok=True)
        store.prune(tag_dir.parent, keep)
    dist_utils.barrier()


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
