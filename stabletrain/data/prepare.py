"""Pre-tokenize a source (or a mixture's sources) into memory-mapped shards that `data.format=pretokenized` reads.

    python -m stabletrain.cli.prepare data=c4 out=/scratch/c4-sp32k data.prepare.workers=32
    python -m stabletrain.cli.prepare data=local data.path='corpus/*.jsonl' out=prepared/corpus

Work is split by input shard (a file of the source, as `datasets`' split_dataset_by_node assigns them) and, when
there are fewer files than workers, by blocks of data.prepare.shard_docs documents within a file. Output shard
(S, B) holds block B of input shard S, so the result does not depend on the number of workers. Each shard is
written atomically with its checksum record; rerunning an interrupted command skips the finished shards (their
documents are read again but not tokenized) and writes manifest.json last. The layout is in shards.py.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from stabletrain import StableTrainError
from stabletrain.config import DataConfig
from stabletrain.data.build import ensure_tokenizer
from stabletrain.data.shards import FORMAT, pick_dtype, write_atomic, write_shard
from stabletrain.data.sources import open_source, source_from_dict
from stabletrain.data.tokenizer import encode_documents, load_tokenizer

KILL_AFTER_ENV = "STABLETRAIN_PREPARE_KILL_AFTER"  # test hook: SIGKILL the whole prepare after N shards written
_progress = None  # worker side: a queue of (documents, tokens) per finished shard


def _init_worker(queue) -> None:
    global _progress
    _progress = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process


@dataclass(frozen=True)
class Unit:
    """One worker task: the blocks b ≡ part (mod parts) of input shard `index` of one source's split."""

    out: str
    source: str
    src: dict
    split: str
    utf8_errors: str
    holdout: list[int]
    tokenizer: str
    dtype: str
    shard_docs: int
    index: int
    part: int
    parts: int
    src_module: str = ""  # where the source's config is defined: a plugin's registers itself in spawned workers too


class _ShardWriter:
    """Collects a block's documents and writes them as one shard (with the stats and the test hook)."""

    def __init__(self, unit: Unit, report):
        self.unit, self.report = unit, report
        self.tok = load_tokenizer(unit.tokenizer, num_threads=1)  # parallelism comes from worker processes
        self.directory = Path(unit.out) / unit.source / unit.split
        self.stats = {"pid": os.getpid(), "tokens": 0, "docs": 0, "busy_s": 0.0, "skipped_shards": 0, "shards": 0}
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
        self.block, self.pending, self.invalid = 0, [], 0

    def finished(self, block: int) -> bool:
        return (self.directory / f"{self.unit.index:05d}_{block:05d}.json").is_file()  # by an earlier run

    def flush(self) -> None:
        if self.pending:
            t0 = time.perf_counter()
            ids = list(encode_documents(self.pending, self.tok))
            name = f"{self.unit.index:05d}_{self.block:05d}"
            record = write_shard(self.directory, name, ids, self.unit.dtype, self.invalid)
            self.stats["busy_s"] += time.perf_counter() - t0  # busy: tokenize + write
            self.stats["tokens"] += record["tokens"]
            self.stats["docs"] += record["docs"]
            self.stats["shards"] += 1
            if self.report:
                self.report((record["docs"], record["tokens"]))
            if self.kill_after and self.stats["shards"] >= self.kill_after:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # as `kill -9` of the job would: no cleanup anywhere
        self.pending, self.invalid = [], 0


def prepare_unit(unit: Unit, report=None) -> dict:
    """Tokenize the unit's blocks; skip blocks already finished."""
    started = time.perf_counter()
    if unit.src_module:
        importlib.import_module(unit.src_module)
    stream = open_source(source_from_dict(unit.src), unit.split, unit.utf8_errors, unit.holdout)
    writer = _ShardWriter(unit, report or (_progress.put if _progress is not None else None))
    seen_invalid = 0
    for text_index, text in enumerate(stream.iter_shard(unit.index)):
        replaced = stream.invalid_utf8_docs > seen_invalid  # the stream counts a document as it decodes it
        seen_invalid = stream.invalid_utf8_docs
        b = text_index // unit.shard_docs
        if b != writer.block:
            writer.flush()
            writer.block = b
        if b % unit.parts != unit.part:
            continue
        if writer.finished(b):
            writer.stats["skipped_shards"] += text_index % unit.shard_docs == 0
            continue
        writer.pending.append(text)
        writer.invalid += replaced
    writer.flush()
    writer.stats["wall_s"] = time.perf_counter() - started  # reading included: a worker's whole time on it
    return writer.stats


def _fingerprint(cfg: DataConfig, tokenizer, dtype: str) -> dict:
    sources = {}
    for name, src in cfg.source_configs().items():
        sources[name] = {
            "config": asdict(src),
            "splits": {s: open_source(src, s, cfg.utf8_errors).fingerprint for s in ("train", "val")},
        }
    return {
        "format": FORMAT,
        "sources": sources,
        "tokenizer_sha256": tokenizer.sha256,
        "dtype": dtype,
        "shard_docs": cfg.prepare.shard_docs,
        "utf8_errors": cfg.utf8_errors,
    }


def _copy_tokenizer(tokenizer, out: Path) -> str:
    """A copy of the tokenizer inside DIR, so the directory trains without the original path."""
    dest = out / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    src = tokenizer.path
    files = (
        [src, src.with_suffix(".json")]
        if src.is_file()
        else [src / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    )
    for f in files:
        if f.is_file():
            write_atomic(dest / f.name, f.read_bytes())
    return src.name if src.is_file() else ""


def prepare(cfg: DataConfig, out: str | os.PathLike, workers: int | None = None, progress: bool = True) -> dict:
    """Pre-tokenize every source and split of `cfg` into `out`; return the manifest plus timing stats."""
    out = Path(out)
    workers = workers or cfg.prepare.workers
    tokenizer = ensure_tokenizer(cfg)
    dtype = pick_dtype(tokenizer.vocab_size, cfg.prepare.dtype)
    fingerprint = _fingerprint(cfg, tokenizer, dtype)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "prepare.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != fingerprint:
        raise StableTrainError(
            f"{out} holds a preparation with other settings (source files, tokenizer, dtype or "
            "shard_docs differ): choose another out= or delete it"
        )
    write_atomic(recorded, (json.dumps(fingerprint, indent=1, sort_keys=True) + "\n").encode())
    for stale in out.rglob(".*.tmp*"):  # half-written files of a killed run (one prepare per directory at a time)
        stale.unlink()
    tok_file = _copy_tokenizer(tokenizer, out)
    t0 = time.perf_counter()
    results = _run(_units(cfg, out, workers, str(tokenizer.path), dtype), workers, f"prepare {cfg.name}", progress, out)
    wall = time.perf_counter() - t0
    manifest = _manifest(cfg, out, fingerprint, tokenizer, tok_file, dtype)
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {"manifest": manifest, "stats": _stats(results, wall, workers)}


def _units(cfg: DataConfig, out: Path, workers: int, tokenizer: str, dtype: str) -> list[Unit]:
    """Every input shard of every source's split; training shards split further when workers outnumber files."""
    units = []
    for name, src in cfg.source_configs().items():
        for split in ("train", "val"):
            stream = open_source(src, split, cfg.utf8_errors)
            holdout = stream.holdout_layout()  # counted once here, not by every worker
            n_in = stream.num_shards
            parts = max(1, workers // n_in) if split == "train" else 1
            (out / name / split).mkdir(parents=True, exist_ok=True)
            units += [
                Unit(
                    str(out),
                    name,
                    asdict(src),
                    split,
                    cfg.utf8_errors,
                    holdout,
                    tokenizer,
                    dtype,
                    cfg.prepare.shard_docs,
                    index,
                    part,
                    parts,
                    type(src).__module__,
                )
                for index in range(n_in)
                for part in range(parts)
            ]
    return units


def _run(units: list[Unit], workers: int, desc: str, progress: bool, out: Path) -> list[dict]:
    """Run the units in this process (workers=1) or in `workers` spawned processes, with a progress bar."""
    bar = tqdm(unit="doc", desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    tokens_done = 0

    def report(item):
        nonlocal tokens_done
        bar.update(item[0])
        tokens_done += item[1]
        bar.set_postfix(tokens=f"{tokens_done:,}", refresh=False)

    try:
        if workers == 1:
            return [prepare_unit(unit, report=report) for unit in units]
        results = []
        ctx = mp.get_context("spawn")  # fork is unsafe with datasets/pyarrow threads
        queue = ctx.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
            pending = {pool.submit(prepare_unit, unit) for unit in units}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        report(queue.get())
                    results += [f.result() for f in done]
            except BaseException:
                for f in pending:  # a worker's error (or Ctrl-C): do not start the remaining units
                    f.cancel()
                raise
            while not queue.empty():
                report(queue.get())
        return results
    except BrokenProcessPool:
        raise StableTrainError(
            f"a prepare worker died (killed, or out of memory); rerun the same command to "
            f"resume {out} from its finished shards"
        ) from None
    finally:
        bar.close()


def _manifest(cfg: DataConfig, out: Path, fingerprint: dict, tokenizer, tok_file: str, dtype: str) -> dict:
    """manifest.json: the settings, the tokenizer, and every source's per-split totals and shard records."""
    tok = {
        "file": tok_file,
        "kind": tokenizer.kind,
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "shard_docs": cfg.prepare.shard_docs,
        "utf8_errors": cfg.utf8_errors,
        "tokenizer": tok,
        "sources": {},
    }
    for name, src in cfg.source_configs().items():
        splits = {}
        for split in ("train", "val"):
            records = [json.loads(p.read_text()) for p in sorted((out / name / split).glob("*.json"))]
            if not records:
                raise StableTrainError(
                    f"source {name!r} split {split!r} ({open_source(src, split).desc}) yielded "
                    "no documents (empty file?)"
                )
            splits[split] = {k: sum(r[k] for r in records) for k in ("tokens", "docs", "invalid_utf8_docs")}
            splits[split]["shards"] = records
        manifest["sources"][name] = {"source": fingerprint["sources"][name], "weight": src.weight, "splits": splits}
    return manifest


def _stats(results: list[dict], wall: float, workers: int) -> dict:
    tokens = sum(r["tokens"] for r in results)
    per_worker: dict[int, dict] = {}
    for r in results:
        w = per_worker.setdefault(r["pid"], {"tokens": 0, "wall_s": 0.0})
        w["tokens"] += r["tokens"]
        w["wall_s"] += r["wall_s"]
    rates = [w["tokens"] / w["wall_s"] for w in per_worker.values() if w["wall_s"]]
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "workers": workers,
        "skipped_shards": sum(r["skipped_shards"] for r in results),
        "per_worker_tokens_per_s": rates,
    }
