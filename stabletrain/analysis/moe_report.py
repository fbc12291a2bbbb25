"""Table and plot of MoE load balance from run directories (metrics.jsonl with moe/* keys).

    python -m stabletrain.analysis.moe_report multirun/moe_balance/* --out docs/experiments/moe_balance
writes <out>/report.md and <out>/maxvio.png.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stabletrain.analysis.report import read_metrics, report_main
from stabletrain.monitoring.plots import log_scale_if_positive, pyplot


def load(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if "moe/maxvio_batch" in r]
    vals = [r for r in rows if "val_loss" in r]
    name = run_dir.name
    if (run_dir / "config.yaml").is_file():
        name = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["ffn"]["router"]["kind"]
    return {"name": name, "train": train, "vals": vals}


def table(runs: list[dict], tail: int = 50) -> str:
    out = [
        f"| router | final val loss | MaxVio batch (mean of last {tail} steps) | MaxVio global (final validation) |",
        "|---|---|---|---|",
    ]
    for r in runs:
        late = r["train"][-tail:]
        out.append(
            f"| {r['name']} | {r['vals'][-1]['val_loss']:.4f} | "
            f"{sum(x['moe/maxvio_batch'] for x in late) / len(late):.3f} | {r['vals'][-1]['moe/maxvio_global']:.3f} |"
        )
    return "\n".join(out) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        steps = [x["step"] for x in r["train"]]
        vio = [x["moe/maxvio_batch"] for x in r["train"]]
        k = 10  # moving average: a per-batch MaxVio is noisy
        smooth = [sum(vio[max(0, i - k + 1) : i + 1]) / len(vio[max(0, i - k + 1) : i + 1]) for i in range(len(vio))]
        a.plot(steps, smooth, label=r["name"])
        b.plot([v["step"] for v in r["vals"]], [v["moe/maxvio_global"] for v in r["vals"]], marker="o", label=r["name"])
    a.set(title="MaxVio per batch (10-step moving average)", xlabel="step")
    b.set(title="MaxVio over the validation set", xlabel="step")
    for ax in (a, b):
        log_scale_if_positive(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    report_main(__doc__.splitlines()[0], load, table, plot, "maxvio.png", argv)


if __name__ == "__main__":
    main()
