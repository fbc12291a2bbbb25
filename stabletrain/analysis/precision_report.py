"""Table and plot of fp32 vs bf16 vs fp8 runs of one model (metrics.jsonl with val_loss and fp8/* keys).

    python -m stabletrain.analysis.precision_report multirun/fp8_tiny/* --out docs/experiments/fp8/tiny
writes <out>/report.md and <out>/val_loss.png; the relative gap is against the bf16 run when there is one.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stabletrain.analysis.report import read_metrics, report_main
from stabletrain.monitoring.plots import pyplot

KINDS = ("attn", "mlp", "expert")


def load(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    name = run_dir.name
    if (run_dir / "config.yaml").is_file():
        p = yaml.safe_load((run_dir / "config.yaml").read_text())["precision"]
        name = p["name"] if not p.get("fp8", {}).get("enabled") else f"fp8 ({p['fp8']['backend']})"
    return {
        "name": name,
        "vals": [r for r in rows if "val_loss" in r],
        "fp8": [r for r in rows if "fp8/scale_max" in r],
    }


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def table(runs: list[dict]) -> str:
    base = next((r for r in runs if r["name"] == "bf16"), runs[0])["vals"][-1]["val_loss"]
    out = [
        "| precision | final val loss | gap vs bf16 | underflow (mean, attn / mlp) | saturated (mean) | "
        "FP8 GEMM rel. error vs bf16 (mean, mlp) | scales (min .. max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        final = r["vals"][-1]["val_loss"]
        row = [r["name"], f"{final:.4f}", f"{(final - base) / base:+.3%}"]
        f = r["fp8"]
        if f:
            under = " / ".join(f"{_mean(f, f'fp8/underflow/{k}'):.2e}" for k in ("attn", "mlp"))
            sat = max(_mean(f, f"fp8/saturated/{k}") or 0.0 for k in KINDS)
            lo, hi = min(x["fp8/scale_min"] for x in f), max(x["fp8/scale_max"] for x in f)
            row += [under, f"{sat:.1e}", f"{_mean(f, 'fp8/gemm_rel_err/mlp'):.4f}", f"{lo:.1e} .. {hi:.1e}"]
        else:
            row += ["—"] * 4
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r for r in runs if r["name"] == "bf16"), None)
    for r in runs:
        steps, loss = [v["step"] for v in r["vals"]], [v["val_loss"] for v in r["vals"]]
        a.plot(steps, loss, marker="o", label=r["name"])
        if base is not None and r is not base:
            ref = {v["step"]: v["val_loss"] for v in base["vals"]}
            gap = [(s, (x - ref[s]) / ref[s] * 100) for s, x in zip(steps, loss) if s in ref]
            b.plot([s for s, _ in gap], [g for _, g in gap], marker="o", label=r["name"])
    a.set(title="validation loss", xlabel="step")
    b.set(title="relative gap to bf16 (%)", xlabel="step")
    b.axhline(0, color="grey", lw=0.8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    report_main(__doc__.splitlines()[0], load, table, plot, "val_loss.png", argv)


if __name__ == "__main__":
    main()
