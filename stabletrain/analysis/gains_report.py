"""Table and plot of signal gains from run directories (metrics.jsonl written with monitor.gain_interval > 0).
The Amax gains are the mHC paper's: forward and backward of the composite from each sublayer to the top
(stabletrain.monitoring.gains); the plot also draws the forward gain from the input up to each sublayer.

    python -m stabletrain.analysis.gains_report multirun/deep_gains/* --out docs/experiments/deep_gains
writes <out>/report.md (a markdown table) and <out>/gains.png.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stabletrain.analysis.report import read_metrics, report_main
from stabletrain.config import ResidualConfig
from stabletrain.monitoring.plots import log_scale_if_positive, pyplot


def load(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    gains = [r for r in rows if "gain/fwd_max" in r]
    vals = [r for r in rows if "val_loss" in r]
    losses = [r for r in rows if "loss" in r]
    name = run_dir.name
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        model = yaml.safe_load(cfg.read_text())["model"]
        res = model["residual"]
        n = ResidualConfig(kind=res["kind"], streams=res["streams"]).n
        name = f"{model['name']} (L={model['n_layers']}, n={n})"
    return {"name": name, "dir": run_dir, "gains": gains, "vals": vals, "losses": losses}


def per_depth(row: dict, prefix: str) -> list[float]:
    keys = sorted((int(k[len(prefix) :]), v) for k, v in row.items() if k.startswith(prefix))
    return [v for _, v in keys]


def table(runs: list[dict]) -> str:
    head = (
        "| run | final val loss | max grad norm | Amax fwd (step 1 → last) | Amax bwd (step 1 → last) "
        "| max over training fwd / bwd | max block fwd gain (last) |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in runs:
        g0, g1 = r["gains"][0], r["gains"][-1]
        has_amax = "gain/amax_fwd_max" in g1

        def amax(key, g0=g0, g1=g1, has_amax=has_amax):
            return f"{g0[key]:.3f} → {g1[key]:.3f}" if has_amax else "—"

        over = (
            (
                f"{max(g['gain/amax_fwd_max'] for g in r['gains']):.3f} / "
                f"{max(g['gain/amax_bwd_max'] for g in r['gains']):.3f}"
            )
            if has_amax
            else "—"
        )
        lines.append(
            f"| {r['name']} | {r['vals'][-1]['val_loss']:.4f} | {max(x['grad_norm'] for x in r['losses']):.3f} "
            f"| {amax('gain/amax_fwd_max')} | {amax('gain/amax_bwd_max')} | {over} | {g1['gain/fwd_max']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        steps = [g["step"] for g in r["gains"]]
        if "gain/amax_fwd_max" in r["gains"][-1]:
            axes[0].plot(steps, [g["gain/amax_fwd_max"] for g in r["gains"]], label=f"{r['name']} fwd")
            axes[0].plot(steps, [g["gain/amax_bwd_max"] for g in r["gains"]], "--", label=f"{r['name']} bwd")
            last = r["gains"][-1]
            fwd, bwd = per_depth(last, "gain/amax_fwd/"), per_depth(last, "gain/amax_bwd/")
            axes[1].plot(range(1, len(fwd) + 1), fwd, label=f"{r['name']} fwd")
            axes[1].plot(range(1, len(bwd) + 1), bwd, "--", label=f"{r['name']} bwd")
            up = per_depth(last, "gain/amax_fwd_from_input/")
            axes[1].plot(range(1, len(up) + 1), up, ":", label=f"{r['name']} fwd from the input")
        axes[2].plot([x["step"] for x in r["losses"]], [x["grad_norm"] for x in r["losses"]], lw=0.8, label=r["name"])
    axes[0].set(title="composite Amax gain, max over depth", xlabel="step")
    axes[1].set(title="Amax gain of the composite from sublayer k to the top (last measurement)", xlabel="sublayer k")
    axes[2].set(title="gradient norm (pre-clip)", xlabel="step")
    for ax in axes:
        log_scale_if_positive(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    report_main(__doc__.splitlines()[0], load, table, plot, "gains.png", argv)


if __name__ == "__main__":
    main()
