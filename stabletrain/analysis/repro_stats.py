"""The arithmetic of the reproduction report, kept apart from run directories so that it can be tested on
hand-built inputs: seed statistics and verdicts, MaxVio aggregation, per-block variance and layer pruning.

A verdict is a named test at the 5% level (stabletrain.analysis.significance), on one value per seed:

- a difference ("a is lower than b"): Welch's t-test of the two means, its 95% confidence interval of mean(a) -
  mean(b). `reproduced`: the interval lies entirely on the side the claim predicts (p < 0.05 in that direction);
  `not reproduced`: entirely on the other side (p < 0.05 against the claim); `inconclusive`: it contains 0, so these
  seeds cannot tell the two apart (which is not evidence that they are equal).
- a bound ("|gap| < 0.25%"): the t interval (n - 1 degrees of freedom) of the mean of the per-seed gaps.
  `reproduced`: the interval lies inside the band; `not reproduced`: entirely outside it; `inconclusive`: it
  crosses an edge of the band.
- a trend ("grows with depth"): the least-squares slope with its t interval (n - 2 degrees of freedom), read as
  a difference from 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from stabletrain.analysis.significance import Interval, mean_interval, ols_slope, welch
from stabletrain.models.moe import maxvio as moe_maxvio

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 4) -> str:
    m, s = mean_sd(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


@dataclass(frozen=True)
class Verdict:
    """A test's interval and the verdict it gives; str() is how the report quotes it."""

    interval: Interval
    verdict: str
    what: str = "Welch"  # the test, as the report names it

    def __str__(self) -> str:
        i = self.interval
        p = "" if math.isnan(i.p) else f", {self.what} p = {i.p:.2g}"
        return f"{i.estimate:+.3g} (95% CI {i.lo:+.3g} … {i.hi:+.3g}{p})"


def below_zero(interval: Interval, what: str = "Welch") -> Verdict:
    """The claim "the estimate is below 0": reproduced when the whole interval is below 0, not reproduced when it
    is above, inconclusive when it contains 0."""
    verdict = REPRODUCED if interval.hi < 0 else NOT_REPRODUCED if interval.lo > 0 else INCONCLUSIVE
    return Verdict(interval, verdict, what)


def above_zero(interval: Interval, what: str = "Welch") -> Verdict:
    """The claim "the estimate is above 0" (a slope that grows, a difference in the other order)."""
    verdict = REPRODUCED if interval.lo > 0 else NOT_REPRODUCED if interval.hi < 0 else INCONCLUSIVE
    return Verdict(interval, verdict, what)


def lower_test(claimed_lower: Sequence[float], other: Sequence[float]) -> Verdict:
    """Is `claimed_lower` below `other`? Welch's t on the per-seed values: mean(claimed_lower) - mean(other)."""
    return below_zero(welch(claimed_lower, other))


def growth_test(xs: Sequence[float], ys: Sequence[float]) -> Verdict:
    """Does y grow with x? The least-squares slope and its t interval."""
    return above_zero(ols_slope(xs, ys), "slope t")


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of parts: reproduced when every part is, not reproduced as soon as one part goes against it."""
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def paired_relative_gap(reference: dict[int, float], other: dict[int, float]) -> list[float]:
    """(other - reference) / reference per seed present in both, in seed order."""
    return [(other[s] - reference[s]) / reference[s] for s in sorted(set(reference) & set(other))]


def within_test(gaps: Sequence[float], bound: float) -> Verdict:
    """Is the mean gap within ±bound? The t interval of the mean: inside the band reproduced, entirely outside it
    not reproduced, across an edge inconclusive."""
    i = mean_interval(gaps)
    inside, outside = -bound < i.lo and i.hi < bound, i.lo > bound or i.hi < -bound
    return Verdict(i, REPRODUCED if inside else NOT_REPRODUCED if outside else INCONCLUSIVE, "t")


def band_reading(v: Verdict, bound: float) -> str:
    """What the interval of a gap says about the ±bound band, in words."""
    i = v.interval
    if v.verdict == REPRODUCED:
        return f"inside ±{100 * bound:.2g}%"
    if v.verdict == NOT_REPRODUCED:
        return f"entirely {'above' if i.lo > bound else 'below'} the ±{100 * bound:.2g}% band"
    edges = [name for name, crossed in (("lower", i.lo <= -bound), ("upper", i.hi >= bound)) if crossed]
    return f"crosses the band's {' and '.join(edges)} edge: this many seeds cannot show the gap is within it"


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


def tail_sd(rows: Sequence[dict], key: str, tail: int) -> float:
    """Sample standard deviation of `key` over the last `tail` rows that have it: how much it oscillates."""
    return statistics.stdev([r[key] for r in rows if key in r][-tail:])


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
