"""Packed token sequences and a deterministic global sample order.

The global order is a pure function of (seed, global sample index): epoch e = g // N visits the samples in
the permutation drawn from Generator([seed, e]). A rank reads its slice of each global batch, so the loader's
whole state is the number of global samples consumed, which survives a change in the number of ranks.
A mixture keeps that property: MixtureOrder picks the source of sample g from (seed, g // block) alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from stabletrain.data.sources import DocumentStream, iter_texts
from stabletrain.data.tokenizer import encode_documents


def _cache_key(files: list[str], tokenizer, text_field: str, extra: str = "") -> str:
    # A sentencepiece model's bytes (the key the bundled corpus's caches were written with), else the files' hash.
    h = hashlib.sha256(tokenizer.path.read_bytes() if tokenizer.path.is_file() else tokenizer.sha256.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}:{text_field}".encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _cached(cache: Path, texts: Iterable[str], tokenizer, meta: dict) -> np.ndarray:
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    pieces = list(encode_documents(texts, tokenizer))
    tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    cache.with_suffix(".json").write_text(json.dumps({**meta, "tokens": int(tokens.size)}) + "\n")
    return tokens


def tokenize_files(files: list[str], tokenizer, text_field: str, cache_dir: Path) -> np.ndarray:
    """All documents of `files`, each followed by EOS, as one int32 array; cached by content key."""
    cache = cache_dir / f"tokens-{_cache_key(files, tokenizer, text_field)}.npy"
    return _cached(cache, iter_texts(files, text_field), tokenizer, {"files": files})


def tokenize_stream(stream: DocumentStream, tokenizer, cache_dir: Path) -> np.ndarray:
    """One split of a source tokenized on the fly (documents joined with EOS), cached by what determines it."""
    fp = stream.fingerprint
    files = [f["path"] for f in fp["files"]]
    simple = not fp["hf_id"] and not fp["holdout"] and fp["max_docs"] is None and fp["utf8_errors"] == "replace"
    extra = "" if simple else json.dumps(fp, sort_keys=True)  # plain local files keep the bundled corpus's key
    cache = cache_dir / f"tokens-{_cache_key(files, tokenizer, fp['text_field'], extra)}.npy"
    return _cached(cache, stream, tokenizer, {"files": files, "source": fp})


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-position document index within each row ([B, T] -> [B, T]): a document ends with (and includes) its EOS,
    so position t belongs to the document after the EOS tokens strictly before it."""
    ends = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends


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

    def target_documents(self, indices: np.ndarray, eos_id: int) -> np.ndarray:
        """[rows, seq_len]: the document (its position in this token stream, 0-based) of every target token of the
        given samples; a document ends with, and includes, its EOS."""
        if getattr(self, "_eos", None) is None:
            self._eos = np.flatnonzero(np.asarray(self.tokens) == eos_id)  # once; forensics only
        offsets = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len + 1 + np.arange(self.seq_len)
        return np.searchsorted(self._eos, offsets, side="left")


class ConcatSequences:
    """Several sources' packed sequences behind one flat sample id space (source s owns [offset_s, offset_s + n_s))."""

    def __init__(self, parts: list[PackedSequences]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, id within that source) of flat sample ids."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        return which, ids - self.offsets[which]

    def target_documents(self, ids: np.ndarray, eos_id: int) -> np.ndarray:
        which, local = self.source_of(ids)
        out = np.zeros((len(which), self.parts[0].seq_len), dtype=np.int64)
        for s in np.unique(which):
            out[which == s] = self.parts[s].target_documents(local[which == s], eos_id)
        return out

    def get(self, ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        out = torch.empty((len(ids), self.parts[0].seq_len + 1), dtype=torch.int64)
        for s in np.unique(which):
            mask = which == s
            out[torch.from_numpy(mask)] = self.parts[s].get(ids[mask] - self.offsets[s])
        return out


class MixtureOrder:
    """Weighted, deterministic sampling across sources, as a pure function of (seed, global sample index).

    The global stream is cut into blocks of `block` samples. Each block holds exactly quota_s samples of source s
    (largest-remainder rounding of block * weight_s), in an order drawn from Generator([seed, block index]); so the
    proportions are exact to 1/block at every block boundary. The k-th sample drawn from source s is sample
    GlobalOrder_s(k) of that source (its own permutation per epoch), returned as a flat ConcatSequences id.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int, block: int = 1024, shuffle: bool = True):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        exact = w * block
        quota = np.floor(exact).astype(np.int64)
        for s in np.argsort(-(exact - quota), kind="stable")[: block - quota.sum()]:
            quota[s] += 1
        self.quota, self.block, self.seed = quota, block, seed
        self.offsets = np.cumsum([0] + list(sizes))
        self.orders = [GlobalOrder(n, (seed, s), shuffle) for s, n in enumerate(sizes)]
        self._cached_block, self._pattern, self._rank = -1, None, None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each position in block b, and how many samples of that source precede it in the block."""
        if b != self._cached_block:
            pattern = np.repeat(np.arange(len(self.quota)), self.quota)
            pattern = np.random.default_rng([self.seed, b, 7]).permutation(pattern)
            rank = np.empty(self.block, dtype=np.int64)
            for s in range(len(self.quota)):
                rank[pattern == s] = np.arange(self.quota[s])
            self._cached_block, self._pattern, self._rank = b, pattern, rank
        return self._pattern, self._rank

    def sources(self, global_indices: np.ndarray) -> np.ndarray:
        g = np.asarray(global_indices, dtype=np.int64)
        out = np.empty_like(g)
        for b in np.unique(g // self.block):
            mask = g // self.block == b
            out[mask] = self._block(int(b))[0][g[mask] % self.block]
        return out

    def consumed_per_source(self, samples: int) -> np.ndarray:
        """How many of the first `samples` global samples came from each source."""
        full, rest = divmod(int(samples), self.block)
        counts = self.quota * full
        if rest:
            counts = counts + np.bincount(self._block(full)[0][:rest], minlength=len(self.quota))
        return counts

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        g = np.asarray(global_indices, dtype=np.int64)
        out = np.empty_like(g)
        for b in np.unique(g // self.block):
            mask = g // self.block == b
            pattern, rank = self._block(int(b))
            src, within = pattern[g[mask] % self.block], rank[g[mask] % self.block]
            k = b * self.quota[src] + within  # the k-th sample drawn from its source
            ids = np.empty_like(k)
            for s in np.unique(src):
                m = src == s
                ids[m] = self.offsets[s] + self.orders[s](k[m])
            out[mask] = ids
        return out


class OrderedView:
    """A dataset read through a fixed order (validation of a mixture: a fixed interleaving of the sources)."""

    def __init__(self, data, order):
        self.data, self.order = data, order

    def __len__(self) -> int:
        return len(self.data)

    def get(self, ids: np.ndarray) -> torch.Tensor:
        return self.data.get(self.order(ids))


class GlobalOrder:
    """Maps a global sample index to a sample id: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int | tuple[int, ...], shuffle: bool = True):
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            seed = list(self.seed) if isinstance(self.seed, tuple) else [self.seed]
            self._perm = np.random.default_rng([*seed, epoch]).permutation(self.n)
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

    def __init__(
        self,
        data: PackedSequences,
        order: GlobalOrder,
        micro_batch_size: int,
        accum: int,
        rank: int,
        world_size: int,
        samples_consumed: int = 0,
    ):
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

    def batch_positions(self, batch_index: int) -> list[int]:
        """Global stream positions of global batch `batch_index`'s rows in rank order (rank, micro-step, row):
        the order in which every rank's rows are gathered."""
        base = batch_index * self.global_batch_size
        return [
            base + m * self.micro * self.world + r * self.micro + j
            for r in range(self.world)
            for m in range(self.accum)
            for j in range(self.micro)
        ]

    def next_batch(self) -> list[torch.Tensor]:
        """The accum micro-batches ([micro, seq_len+1] token tensors) of the next global batch."""
        batches = [self.data.get(self.order(self.global_indices(m))) for m in range(self.accum)]
        self.samples_consumed += self.global_batch_size
        return batches
