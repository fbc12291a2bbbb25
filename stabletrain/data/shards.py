"""The pre-tokenized format that `python -m stabletrain.cli.prepare` writes and `data.format=pretokenized` reads.

    DIR/manifest.json                       written last: source(s), tokenizer hash and ids, dtype, counts, checksums
    DIR/tokenizer/                          a copy of the tokenizer (sentencepiece .model + .json, or HF files)
    DIR/<source>/<split>/SSSSS_BBBBB.bin    token ids (uint16 when the vocabulary fits, else uint32), little-endian;
                                            each document followed by EOS; block B of input shard S
    DIR/<source>/<split>/SSSSS_BBBBB.idx    int64 end offset of every document in the .bin (the index)
    DIR/<source>/<split>/SSSSS_BBBBB.json   per-shard record (tokens, documents, sha256 of both files): a shard is
                                            finished when this exists, so an interrupted prepare redoes only the rest

The token stream of a split is its shards in name order, which is the source's document order: the same stream
on-the-fly tokenization produces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stabletrain import StableTrainError
from stabletrain.data.tokenizer import file_sha256, load_tokenizer

FORMAT = "stabletrain-pretokenized/1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def pick_dtype(vocab_size: int, requested: str = "auto") -> str:
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested == "uint16" and vocab_size > 1 << 16:
        raise StableTrainError(
            f"data.prepare.dtype=uint16 cannot hold token ids up to {vocab_size - 1} (vocabulary "
            f"{vocab_size} > 65536): use data.prepare.dtype=uint32 or auto"
        )
    return requested


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename: a killed writer leaves no half file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(directory: Path, name: str, docs: list[np.ndarray], dtype: str, invalid_utf8_docs: int) -> dict:
    """Write one shard (tokens, index, record) atomically; return its record."""
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    if tokens.size and int(tokens.max()) >= np.iinfo(DTYPES[dtype]).max + 1:
        raise StableTrainError(f"token id {int(tokens.max())} does not fit {dtype}")  # never silently wrapped
    ends = np.cumsum([len(d) for d in docs], dtype=np.int64)
    bin_bytes, idx_bytes = tokens.astype(DTYPES[dtype]).tobytes(), ends.astype("<i8").tobytes()
    write_atomic(directory / f"{name}.bin", bin_bytes)
    write_atomic(directory / f"{name}.idx", idx_bytes)
    record = {
        "name": name,
        "tokens": int(tokens.size),
        "docs": len(docs),
        "invalid_utf8_docs": invalid_utf8_docs,
        "sha256": file_sha256(directory / f"{name}.bin"),
        "idx_sha256": file_sha256(directory / f"{name}.idx"),
    }
    write_atomic(directory / f"{name}.json", (json.dumps(record, sort_keys=True) + "\n").encode())
    return record


class ShardedTokens:
    """The memory-mapped shards of one split as one flat token array (fancy indexing across shard boundaries)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index) -> np.ndarray:
        flat = np.asarray(index, dtype=np.int64)
        shape, flat = flat.shape, flat.ravel()
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int64)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.arrays[s][flat[mask] - self.offsets[s]]
        return out.reshape(shape)


class PreparedDir:
    """A directory written by `prepare`: its manifest, verified on request, and its splits as token arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise StableTrainError(
                f"{self.path} holds no manifest.json: not a finished `python -m "
                "stabletrain.cli.prepare` output (an interrupted one resumes when rerun)"
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise StableTrainError(f"{manifest} is not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise StableTrainError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.dtype = DTYPES[self.manifest["dtype"]]

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer" / self.manifest["tokenizer"]["file"]

    def check_tokenizer(self, tokenizer, where: str) -> None:
        want = self.manifest["tokenizer"]
        if tokenizer.sha256 != want["sha256"]:
            raise StableTrainError(
                f"tokenizer mismatch: {self.path} was prepared with tokenizer sha256 {want['sha256'][:12]}… "
                f"(vocab {want['vocab_size']}), but {where}={tokenizer.path} has sha256 {tokenizer.sha256[:12]}… "
                f"(vocab {tokenizer.vocab_size}); use the tokenizer in {self.path / 'tokenizer'} or prepare again"
            )

    def _shards(self, source: str, split: str) -> list[dict]:
        try:
            return self.manifest["sources"][source]["splits"][split]["shards"]
        except KeyError:
            raise StableTrainError(
                f"{self.path}: the manifest has no split {split!r} of source {source!r} "
                f"(sources: {', '.join(self.sources)})"
            ) from None

    def verify(self, checksums: bool = True) -> None:
        """Every shard present, of the size the manifest records, and (checksums) with the recorded sha256."""
        for source in self.sources:
            for split in self.manifest["sources"][source]["splits"]:
                for shard in self._shards(source, split):
                    base = self.path / source / split / shard["name"]
                    for suffix, key, size in (
                        (".bin", "sha256", shard["tokens"] * self.dtype.itemsize),
                        (".idx", "idx_sha256", shard["docs"] * 8),
                    ):
                        f = base.with_suffix(suffix)
                        if not f.is_file():
                            raise StableTrainError(f"shard file missing: {f} (listed in {self.path / 'manifest.json'})")
                        actual = f.stat().st_size
                        if actual == 0:
                            raise StableTrainError(f"empty shard: {f} has 0 bytes, the manifest records {size}")
                        if actual != size:
                            raise StableTrainError(f"shard {f} has {actual} bytes, the manifest records {size}")
                        if checksums and file_sha256(f) != shard[key]:
                            raise StableTrainError(
                                f"checksum mismatch: {f} does not match its sha256 in the "
                                "manifest (corrupt or modified); prepare it again"
                            )

    def tokens(self, source: str, split: str) -> ShardedTokens:
        arrays = []
        for shard in self._shards(source, split):
            f = self.path / source / split / f"{shard['name']}.bin"
            if not f.is_file():
                raise StableTrainError(f"shard file missing: {f} (listed in {self.path / 'manifest.json'})")
            if f.stat().st_size == 0:
                raise StableTrainError(f"empty shard: {f} has 0 bytes")
            arrays.append(np.memmap(f, dtype=self.dtype, mode="r"))
        return ShardedTokens(arrays)

    def load_tokenizer(self, configured: str | None):
        """The configured tokenizer when it exists (checked against the manifest), else the directory's copy."""
        if configured and Path(configured).exists():
            tok = load_tokenizer(configured)
            self.check_tokenizer(tok, "data.tokenizer.path")
            return tok
        tok = load_tokenizer(self.tokenizer_path())
        self.check_tokenizer(tok, "the copy")
        return tok
