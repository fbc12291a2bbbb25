"""The reproduction report's figures: one PNG per claim, mean over seeds with ± one standard deviation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stabletrain.monitoring.plots import log_scale_if_positive, pyplot


def _save(fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _curve(runs, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and per-seed values (seeds x steps) of `key`, on the steps every run logged."""
    series = [{r["step"]: r[key] for r in run.rows if key in r} for run in runs]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series])


def _band(ax, steps, values, label, **kw) -> None:
    mean, sd = values.mean(0), values.std(0)
    (line,) = ax.plot(steps, mean, label=label, **kw)
    ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)


def gains(groups: dict, path: Path) -> None:
    """Peak composite Amax gain against depth; the Amax gain over training at the greatest depth."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in sorted({k for k, _ in groups}):
        depths = sorted(L for k, L in groups if k == kind)
        peaks = [
            [max(r["gain/amax_fwd_max"] for r in run.rows if "gain/amax_fwd_max" in r) for run in groups[(kind, L)]]
            for L in depths
        ]
        _mean_and_spread(a, depths, peaks, f"{kind} forward")
        deepest = groups[(kind, depths[-1])]
        for key, style in (("gain/amax_fwd_max", "-"), ("gain/amax_bwd_max", "--")):
            steps, values = _curve(deepest, key)
            _band(b, steps, values, f"{kind} {key.split('_')[1]} ({depths[-1]} blocks)", linestyle=style)
    a.set(title="peak composite Amax gain over training", xlabel="blocks")
    b.set(title="composite Amax gain during training", xlabel="step")
    for ax in (a, b):
        log_scale_if_positive(ax)
    _save(fig, (a, b), path)


def loss_curves(groups: dict, path: Path, title: str) -> None:
    """Validation loss over training (mean ± sd over seeds) and the final held-out loss per variant."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names = list(groups)
    for name in names:
        steps, values = _curve(groups[name], "val_loss")
        keep = steps > 0  # step 0 (the initial loss) flattens the interesting part of the curve
        _band(a, steps[keep], values[:, keep], name)
    held = [[r.heldout_loss for r in groups[n]] for n in names]
    b.bar(names, [np.mean(h) for h in held], yerr=[np.std(h) for h in held], capsize=4, label="held-out (KJV)")
    low = min(min(h) for h in held)
    b.set_ylim(low - 0.3, max(max(h) for h in held) + 0.1)
    a.set(title=title, xlabel="step")
    b.set(title="held-out loss of the final weights")
    _save(fig, (a, b), path)


def depth_profile(groups: dict, path: Path) -> None:
    """Per-block output variance and the loss increase when each block is removed."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in groups.items():
        var = np.array([r.depth["variance"] for r in runs])
        inc = np.array([r.depth["prune_increase"] for r in runs])
        x = np.arange(1, var.shape[1] + 1)
        a.errorbar(x, var.mean(0), yerr=var.std(0), marker="o", capsize=3, label=name)
        b.errorbar(x, inc.mean(0), yerr=inc.std(0), marker="o", capsize=3, label=name)
    a.set(title="output variance after each block", xlabel="block", yscale="log")
    b.set(title="validation-loss increase when the block is removed", xlabel="block")
    _save(fig, (a, b), path)


def moe(groups: dict, u_groups: dict, path: Path) -> None:
    """MaxVio per batch over training per router; MaxVio global and validation loss against u."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in groups.items():
        steps, values = _curve(runs, "moe/maxvio_batch")
        w = min(10, len(steps))  # a per-batch MaxVio is noisy: 10-step moving average (shorter runs: all steps)
        smooth = np.array([np.convolve(v, np.ones(w) / w, mode="valid") for v in values])
        _band(a, steps[w - 1 :], smooth, name)
    us = sorted(u_groups)
    vio = [[r.vals[-1]["moe/maxvio_global"] for r in u_groups[u]] for u in us]
    _mean_and_spread(b, us, vio, "aux_free MaxVio global")
    a.set(title="MaxVio per batch (10-step moving average)", xlabel="step")
    b.set(title="aux_free: MaxVio over the validation set against u", xlabel="bias update rate u", xscale="log")
    log_scale_if_positive(a)
    _save(fig, (a, b), path)


def _mean_and_spread(ax, xs: list, samples: list[list[float]], label: str) -> None:
    """One point per x: the mean of its seeds' values, with their standard deviation as the error bar."""
    means, spreads = [np.mean(v) for v in samples], [np.std(v) for v in samples]
    ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=label)
