"""Packed token sequences and a deterministic global sample order.

The global order is a pure function of (seed, global sample index): epoch e = g // N visits the samples in
the permutation drawn from Generator([seed, e]). A rank reads its slice of each global batch, so the loader's
whole state is the number of global samples consumed, which survives a change in the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stabletrain.data.sources import iter_texts
from stabletrain.data.tokenizer import Tokenizer


def _cache_key(files: list[str], tokenizer: Tokenizer, text_field: str) -> str:
    h = hashlib.sha256(tokenizer.path.read_bytes())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}:{text_field}".encode())
    return h.hexdigest()[:16]


def tokenize_files(files: list[str], tokenizer: Tokenizer, text_field: str, cache_dir: Path) -> np.ndarray:
    """All documents of `files`, each followed by EOS, as one int32 array; cached by content key."""
    cache = cache_dir / f"tokens-{_cache_key(files, tokenizer, text_field)}.npy"
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    pieces = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer.encode(batch):
            pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
        batch.clear()

    for text in iter_texts(files, text_field):
        batch.append(text)
        if len(batch) >= 64:
            flush()
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    (cache.with_suffix(".json")).write_text(json.dumps({"files": files, "tokens": int(tokens.size)}) + "\n")
    return tokens


@dataclass
class PackedSequences:
    """Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets) over a token stream."""

    tokens: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        starts = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[starts + np.arange(self.seq_len + 1)], dtype=np.int64))


class GlobalOrder:
    """Maps a global sample index to a sample id: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        global_indices = np.asarray(global_indices, dtype=np.int64)
        if not self.shuffle:
            return global_indices % self.n
        out = np.empty_like(global_indices)
        epochs = global_indices // self.n
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._permutation(int(e))[global_indices[mask] % self.n]
        return out


class RankLoader:
    """This rank's micro-batches of each global batch.

    A global batch holds micro_batch_size · world_size · accum samples. Micro-step m of rank r reads positions
    m·(micro·world) + r·micro + [0, micro) of it, so every micro-step across ranks is one contiguous block.
    """

    def __init__(self, data: PackedSequences, order: GlobalOrder, micro_batch_size: int, accum: int,
                 rank: int, world_size: int, samples_consumed: int = 0):
        self.data, self.order = data, order
        self.micro, self.accum, self.rank, self.world = micro_batch_size, accum, rank, world_size
        self.samples_consumed = samples_consumed

    @property
    def global_batch_size(self) -> int:
        return self.micro * self.world * self.accum

    def global_indices(self, micro_step: int, start: int | None = None) -> np.ndarray:
        base = self.samples_consumed if start is None else start
        first = base + micro_step * self.micro * self.world + self.rank * self.micro
        return np.arange(first, first + self.micro)

    def next_batch(self) -> list[torch.Tensor]:
        """The accum micro-batches ([micro, seq_len+1] token tensors) of the next global batch."""
        batches = [self.data.get(self.order(self.global_indices(m))) for m in range(self.accum)]
        self.samples_consumed += self.global_batch_size
        return batches
