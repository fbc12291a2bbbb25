"""A deterministic global sample order: a pure function of (seed, global sample index).

Epoch e = g // N visits the samples in the permutation drawn from Generator([seed, e]). A rank reads its slice of
each global batch (loader.py), so the loader's whole state is the number of global samples consumed, which survives
a change in the number of ranks. A mixture keeps that property: MixtureOrder picks the source of sample g from
(seed, g // block) alone.
"""

from __future__ import annotations

import numpy as np
import torch


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
