"""Packing: each document followed by EOS, the documents concatenated, the stream cut into non-overlapping windows
of seq_len+1 tokens (inputs and shifted targets); a document longer than seq_len spans consecutive windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
