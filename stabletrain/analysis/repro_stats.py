"""The arithmetic of the reproduction report, kept apart from run directories so that it can be tested on
hand-built inputs: seed statistics and verdicts, MaxVio aggregation, per-block variance and layer pruning.

A verdict compares means with one standard deviation over seeds on each side: `reproduced` only when the claimed
difference exceeds both spreads, `not reproduced` when the opposite difference does, otherwise `inconclusive`.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch
from torch import nn

from stabletrain.models.moe import maxvio as moe_maxvio

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 4) -> str:
    m, s = mean_sd(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def lower_verdict(claimed_lower: Sequence[float], other: Sequence[float]) -> str:
    """Is `claimed_lower` below `other` by more than the seed spreads?"""
    (a, sa), (b, sb) = mean_sd(claimed_lower), mean_sd(other)
    if a + sa < b - sb:
        return REPRODUCED
    if a - sa > b + sb:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def lowest_verdict(claimed: Sequence[float], others: Sequence[Sequence[float]]) -> str:
    """Is `claimed` below every one of `others`? Not reproduced as soon as one comparison goes the other way."""
    verdicts = [lower_verdict(claimed, o) for o in others]
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def paired_relative_gap(reference: dict[int, float], other: dict[int, float]) -> list[float]:
    """(other - reference) / reference per seed present in both, in seed order."""
    return [(other[s] - reference[s]) / reference[s] for s in sorted(set(reference) & set(other))]


def within_verdict(gaps: Sequence[float], bound: float) -> str:
    """Is |mean gap| below `bound` by more than the spread? Above it by more than the spread: not reproduced."""
    m, s = mean_sd(gaps)
    if abs(m) + s < bound:
        return REPRODUCED
    if abs(m) - s > bound:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def maxvio(load: Sequence[float]) -> float:
    """(max load - mean load) / mean load over experts: the definition the MoE metrics use."""
    return moe_maxvio(torch.tensor(load, dtype=torch.float64))


def maxvio_global(loads: Sequence[Sequence[float]]) -> float:
    """MaxVio of the summed load of many batches: the imbalance of the whole set, not the mean of each batch's."""
    return maxvio([sum(col) for col in zip(*loads)])


def maxvio_over_steps(rows: Sequence[dict], tail: int, prefix: str = "moe/load/") -> float:
    """MaxVio of each MoE layer's expert loads summed over the last `tail` logged steps (`moe/load/<layer>` rows),
    averaged over layers: the balance of many batches together, as MaxVio_global is of the validation set."""
    layers = sorted({k for r in rows for k in r if k.startswith(prefix)})
    return statistics.fmean(maxvio_global([r[k] for r in rows if k in r][-tail:]) for k in layers)


def tail_mean(rows: Sequence[dict], key: str, tail: int) -> float:
    """Mean of `key` over the last `tail` rows that have it."""
    return statistics.fmean([r[key] for r in rows if key in r][-tail:])


class StreamProbe:
    """Set as Transformer.probe: keeps the variance of the residual stream entering each block (index i) and, at
    index n_blocks, leaving the last."""

    def __init__(self):
        self.var: dict[int, float] = {}

    def observe(self, index: int, x: torch.Tensor) -> None:
        self.var[index] = float(x.float().var())


@torch.no_grad()
def block_output_variance(model: nn.Module, tokens: torch.Tensor) -> list[float]:
    """Variance of the stream after each block (block 1 .. n) on one batch."""
    probe = model.probe = StreamProbe()
    try:
        model(tokens)
    finally:
        model.probe = None
    return [probe.var[i + 1] for i in range(len(model.blocks))]


@torch.no_grad()
def prune_increase(blocks: nn.ModuleList, loss: Callable[[], float]) -> list[float]:
    """The loss increase when each block in turn is replaced by the identity (its input passes through)."""
    base = loss()
    increase = []
    for block in blocks:
        block.forward = lambda x, *args, **kwargs: x
        try:
            increase.append(loss() - base)
        finally:
            del block.forward  # back to the class's forward
    return increase
