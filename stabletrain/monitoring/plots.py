"""Plot helpers that keep a figure drawable whatever the run logged: NaN/Inf become gaps, and an axis is
log-scaled only when it has positive finite data (matplotlib refuses a log axis without any)."""

from __future__ import annotations

import math
from typing import Iterable


def finite(values: Iterable) -> list[float]:
    """Floats with NaN in place of NaN/Inf/None and of the strings metrics.jsonl writes for them."""
    out = []
    for v in values:
        v = float(v) if isinstance(v, (int, float, str)) else float("nan")
        out.append(v if math.isfinite(v) else float("nan"))
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_scale_if_positive(ax) -> None:
    """Log y-scale when any drawn line or bar has a positive finite value; otherwise leave it linear."""
    values = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
    values += [p.get_height() for p in ax.patches]
    if any(math.isfinite(v) and v > 0 for v in values):
        ax.set_yscale("log")
