"""Read back an offline W&B run (``wandb.init(mode="offline", dir=RUN_DIR)``) without the W&B service.

A ``.wandb`` file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type) and a piece of a serialized
``wandb_internal_pb2.Record``. wandb 0.31 no longer ships a Python reader (the old
``sdk/internal/datastore.py`` is gone; wandb-core reads these files in Go), so the framing is parsed here.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CRC_SEED = [zlib.crc32(bytes([t])) for t in range(5)]  # crc covers the type byte, then the data


@dataclass
class OfflineRun:
    """What an offline run logged. History keys of nested dicts are joined with ``.`` ("a.b")."""

    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, str]] = field(default_factory=list)
    run_id: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def find_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """All ``run-*.wandb`` files under ``<run_dir>/wandb/``, oldest first (a resumed run has several)."""
    root = Path(run_dir) / "wandb"
    files = {p.resolve() for p in root.glob("*/run-*.wandb") if not p.parent.is_symlink()}  # skip latest-run
    return sorted(files, key=lambda p: (p.stat().st_mtime, str(p)))


def read_run(path_or_run_dir: str | os.PathLike) -> OfflineRun:
    """Read one ``.wandb`` file, or every run file of a run dir (history/alerts concatenated in file order;
    summary, config and run_id from the last file)."""
    path = Path(path_or_run_dir)
    files = [path] if path.is_file() else find_run_files(path)
    if not files:
        raise FileNotFoundError(f"no W&B run file (wandb/*/run-*.wandb) under {path}")
    run = OfflineRun()
    for f in files:
        part = _read_file(f)
        run.history += part.history
        run.alerts += part.alerts
        run.summary, run.config, run.run_id = part.summary, part.config, part.run_id or run.run_id
        run.name, run.group, run.tags = part.name or run.name, part.group or run.group, part.tags or run.tags
    return run


def _read_file(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb  # imports all of wandb (~0.6 s), so only when needed

    run = OfflineRun()
    for data in _records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): _value(i) for i in rec.history.item}
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, rec.summary.update, rec.summary.remove)
        elif kind == "run":
            run.run_id = rec.run.run_id or run.run_id
            run.name, run.group, run.tags = rec.run.display_name, rec.run.run_group, list(rec.run.tags)
            _apply(run.config, rec.run.config.update, rec.run.config.remove)
        elif kind == "config":
            _apply(run.config, rec.config.update, rec.config.remove)
        elif kind == "alert":
            run.alerts.append({"title": rec.alert.title, "text": rec.alert.text, "level": rec.alert.level})
    run.summary = {k: v for k, v in run.summary.items() if k.split(".")[0] != "_wandb"}
    run.config.pop("_wandb", None)
    run.config = _unwrap(run.config)
    return run


def _records(path: Path) -> Iterator[bytes]:
    """Yield each record's bytes, reassembling chunks split across blocks; stop quietly at a truncated tail
    (a run still being written)."""
    with open(path, "rb") as fh:
        buf = fh.read()
    if len(buf) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(buf) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B offline run file (bad header)")
    pos, pending = _FILE_HEADER.size, None
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # zero padding at the end of a block
            pos += left
        if pos + _CHUNK_HEADER.size > len(buf):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(buf, pos)
        start, pos = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if pos > len(buf) or (kind == 0 and length == 0):
            return
        chunk = buf[start:pos]
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or zlib.crc32(chunk, _CRC_SEED[kind]) != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {start - _CHUNK_HEADER.size}")
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = [chunk]
        elif pending is None:
            raise ValueError(f"{path}: chunk continues no record at byte {start - _CHUNK_HEADER.size}")
        else:
            pending.append(chunk)
            if kind == _LAST:
                yield b"".join(pending)
                pending = None


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _value(item: Any) -> Any:
    return json.loads(item.value_json)  # json accepts the NaN / Infinity that W&B writes


def _apply(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        target[_key(item)] = _value(item)
    for item in removes:
        target.pop(_key(item), None)


def _unwrap(config: dict[str, Any]) -> dict[str, Any]:
    """Strip W&B's ``{"value": v, "desc": ...}`` wrapping, but only when every entry is wrapped: wandb 0.31
    stores config unwrapped in ``.wandb`` files, so a lone ``{"value": 5}`` is the user's own value."""
    wrapped = all(isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"} for v in config.values())
    return {k: v["value"] for k, v in config.items()} if config and wrapped else config
