"""Our spike rule against OLMo-core's skip-step rule, on a synthetic trace with known events.

    python -m stabletrain.analysis.spike_rules --out docs/experiments/spike_rules

writes report.md (which events each rule catches, false alarms) and trace.png. The trace is a smooth loss
curve and a gradient-norm level with small noise (the regime of a large batch, where z-scores are meaningful),
plus events placed at known steps. Both rules run through the same SpikeMonitor the trainer uses, with the
default config (window 128, sigma 6, warm-up 64) and only `monitor.style` changed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stabletrain.config import MonitorConfig
from stabletrain.config.choices import DetectorStyle
from stabletrain.monitoring.plots import log_scale_if_positive, pyplot
from stabletrain.training.detectors import SpikeMonitor


@dataclass
class Event:
    name: str
    steps: range  # the steps a rule should (or, for `harmless`, should not) fire on
    harmless: bool = False  # a change that is not a spike: firing on it skips good updates


def synthetic_trace(steps: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[Event]]:
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)
    loss = 3.0 + 4.0 * np.exp(-t / 300) + rng.normal(0, 0.02, steps)
    grad = 0.8 + 0.4 * np.exp(-t / 200) + rng.normal(0, 0.03, steps)
    events = [
        Event("loss spike x1.5, one step", range(300, 301)),
        Event("gradient norm x2, one step (z about 25)", range(400, 401)),
        Event("burst: loss +1.0 for 10 steps", range(500, 510)),
        Event("gradient norm x10, one step", range(700, 701)),
        Event("loss drops by 0.5 and stays (new data mix)", range(800, 810), harmless=True),
        Event("gradient norm x4, one step", range(1000, 1001)),
    ]
    i = lambda s: s - 1  # noqa: E731  (steps are 1-based, arrays 0-based)
    loss[i(300)] *= 1.5
    grad[i(400)] *= 2.0
    loss[i(500) : i(510)] += 1.0
    grad[i(700)] *= 10.0
    loss[i(800) :] -= 0.5
    grad[i(1000)] *= 4.0
    return loss, grad, events


def fired_steps(loss: np.ndarray, grad: np.ndarray, style: str) -> list[int]:
    """Steps on which the monitor fires, with every other setting at its default."""
    monitor = SpikeMonitor(MonitorConfig(style=DetectorStyle(style)))
    return [
        step for step, (l, g) in enumerate(zip(loss, grad), start=1) if monitor.judge(step, float(l), float(g)).fired
    ]


def score(fired: list[int], events: list[Event]) -> dict:
    """Per event: how many of its steps fired; plus firings outside every event (false alarms)."""
    hits = {e.name: sum(s in e.steps for s in fired) for e in events}
    inside = {s for e in events for s in e.steps}
    # A harmless event's effect can last past its listed steps; count those firings against it too.
    for e in events:
        if e.harmless:
            later = [s for s in fired if s >= e.steps.start and s not in inside]
            hits[e.name] += len(later)
            inside |= set(later)
    return {"hits": hits, "false_alarms": [s for s in fired if s not in inside]}


def report(events: list[Event], scores: dict[str, dict]) -> str:
    styles = list(scores)
    lines = [
        "| event | steps | " + " | ".join(f"`{s}` fires on" for s in styles) + " |",
        "|---|---|" + "---|" * len(styles),
    ]
    for e in events:
        cells = []
        for s in styles:
            n = scores[s]["hits"][e.name]
            cells.append(f"{n} step(s){' (false alarm)' if e.harmless and n else ''}")
        where = f"{e.steps.start}" + (f"–{e.steps.stop - 1}" if len(e.steps) > 1 else "")
        lines.append(f"| {e.name}{' — harmless' if e.harmless else ''} | {where} | " + " | ".join(cells) + " |")
    lines.append("| anything else | | " + " | ".join(str(len(scores[s]["false_alarms"])) for s in styles) + " |")
    return "\n".join(lines) + "\n"


def plot(loss, grad, fired: dict[str, list[int]], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    steps = np.arange(1, len(loss) + 1)
    for ax, series, label in ((axes[0], loss, "loss"), (axes[1], grad, "gradient norm")):
        ax.plot(steps, series, lw=0.7, color="0.3", label=label)
        for k, (style, where) in enumerate(fired.items()):
            ax.scatter(
                where,
                series[np.array(where, dtype=int) - 1] if where else [],
                s=18,
                marker="ov"[k],
                label=f"{style} fires",
                zorder=3,
            )
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    log_scale_if_positive(axes[1])
    axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    loss, grad, events = synthetic_trace()
    fired = {style: fired_steps(loss, grad, style) for style in ("stabletrain", "olmo_core")}
    scores = {style: score(f, events) for style, f in fired.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(events, scores)
    (args.out / "report.md").write_text(text)
    plot(loss, grad, fired, args.out / "trace.png")
    print(text)


if __name__ == "__main__":
    main()
