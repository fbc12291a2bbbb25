"""Field declarations with their allowed values, so that every number's range and every closed vocabulary lives
in the schema beside the field (one place), and one generic check (`check_ranges`) covers them all.

    lr: float = positive(1e-3)            # > 0 and finite
    warmup_steps: int = at_least(0, 20)   # >= 0
    betas: List[float] = unit_list([0.9, 0.95], length=2, hi_open=True)

Closed vocabularies are `StrEnum`s: Hydra's structured configs reject an unknown value at compose time, naming the
key, and a member compares equal to its string (`cfg.precision.dtype == "bf16"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any

from stabletrain import StableTrainError


class ConfigError(StableTrainError):
    pass


@dataclass(frozen=True)
class Range:
    """lo <= x <= hi (either end open or absent); non-finite floats are refused unless allow_inf."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    allow_inf: bool = False

    def describe(self, value: Any = None) -> str:
        """What a value must be; for a non-finite `value`, finiteness is named first (inf is not "out of range")."""
        parts = []
        if isinstance(value, float) and not math.isfinite(value) and not self.allow_inf:
            parts.append("finite")
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) if parts else "a finite number"

    def violated(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return True
        if isinstance(x, float) and not math.isfinite(x) and not (self.allow_inf and x == math.inf):
            return True
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return True
        return self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi))


def _ranged(default: Any, rng: Range, **meta: Any):
    if isinstance(default, list):
        value = list(default)
        return field(default_factory=lambda: list(value), metadata={"range": rng, **meta})
    return field(default=default, metadata={"range": rng, **meta})


def at_least(lo: float, default: Any, **meta: Any):
    """x >= lo (ints: counts and intervals; Optional fields may also be None)."""
    return _ranged(default, Range(lo=lo), **meta)


def positive(default: Any, **meta: Any):
    return _ranged(default, Range(lo=0, lo_open=True), **meta)


def between(lo: float, hi: float, default: Any, *, lo_open: bool = False, hi_open: bool = False, **meta: Any):
    return _ranged(default, Range(lo, hi, lo_open, hi_open), **meta)


def finite(default: Any, **meta: Any):
    """Any finite number (signed logits, test perturbation scales)."""
    return _ranged(default, Range(), **meta)


class Choice(StrEnum):
    """Base of the closed vocabularies; str() and f-strings give the value."""


def check_ranges(node: Any, prefix: str) -> None:
    """Every field with a declared Range (lists: every item, and `length` when declared), recursively; a float
    field without one must still be finite. Raises ConfigError naming the first offending key (prefixed with
    `prefix.` unless prefix is empty: a command's own arguments)."""
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(value):
            check_ranges(value, key)
            continue
        rng: Range | None = f.metadata.get("range")
        length = f.metadata.get("length")
        if isinstance(value, list) and length is not None and len(value) != length:
            raise ConfigError(f"{key}={value} must have {length} entries")
        if value is None or rng is None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number")
            continue
        for item in _flat(value):
            if rng.violated(item):
                what = f"{key}={value}" if not isinstance(value, list) else f"{key} entry {item} (in {value})"
                raise ConfigError(f"{what} must be {rng.describe(item)}")


def _flat(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]
