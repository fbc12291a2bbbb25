"""This rank's micro-batches of each global batch, read through the global order."""

from __future__ import annotations

import numpy as np
import torch

from stabletrain.data.order import GlobalOrder
from stabletrain.data.packing import PackedSequences


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
