"""A sweep's summary: one row per job (its overrides, status, final validation loss, steps, spikes, the error of a
failed job), best first, as summary.md and summary.csv, and the validation-loss curves as val_loss.png.

    python -m stabletrain.analysis.sweep multirun/<sweep>            # writes into the sweep directory
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import yaml

from stabletrain.analysis.report import count_events, markdown_table, read_jsonl, read_metrics
from stabletrain.monitoring.plots import pyplot


def job_overrides(job: Path) -> list[str]:
    if (job / "overrides.json").is_file():  # the torchrun launcher
        return json.loads((job / "overrides.json").read_text())
    if (job / ".hydra" / "overrides.yaml").is_file():  # Hydra's own launchers
        return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return []


def _error(job: Path) -> str:
    log = job / "launcher.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    ours = [ln for ln in lines if ln.startswith("stabletrain:")]  # a user error: its one line
    named = ours or [ln for ln in lines if "Error" in ln]
    return (named or lines or ["no output"])[-1].strip()[:200]


def load_job(job: Path) -> dict:
    rows = read_metrics(job)
    vals = [r for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    status = int((job / "exit_status").read_text()) if (job / "exit_status").is_file() else (0 if vals else None)
    return {
        "job": job.name,
        "overrides": job_overrides(job),
        "status": "ok" if status == 0 else ("running or lost" if status is None else f"failed ({status})"),
        "val_loss": vals[-1]["val_loss"] if vals else math.nan,
        "steps": steps[-1]["step"] if steps else 0,
        "spikes": count_events(read_jsonl(job / "events.jsonl"), "spike"),
        "error": _error(job) if status not in (0, None) else "",
        "curve": [(v["step"], v["val_loss"]) for v in vals],
    }


def jobs_of(sweep: Path) -> list[Path]:
    marks = ("config.yaml", "exit_status", "launcher.log")
    return sorted(
        (d for d in sweep.iterdir() if d.is_dir() and any((d / m).exists() for m in marks)), key=lambda d: d.name
    )


def summarize(sweep: Path) -> list[dict]:
    jobs = [load_job(d) for d in jobs_of(sweep)]
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
    for j in jobs:
        j["varied"] = [o for o in j["overrides"] if o not in common] or j["overrides"]  # what tells jobs apart
    return sorted(jobs, key=lambda j: (math.isnan(j["val_loss"]), j["val_loss"]))


def write(sweep: Path, jobs: list[dict]) -> None:
    head = ["job", "overrides", "status", "final val_loss", "steps", "spikes", "error"]
    rows = [
        [j["job"], " ".join(j["varied"]), j["status"], f"{j['val_loss']:.4f}", j["steps"], j["spikes"], j["error"]]
        for j in jobs
    ]
    (sweep / "summary.md").write_text(f"# Sweep {sweep.name}\n\n" + markdown_table(head, rows))
    with open(sweep / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for j in jobs:
        if j["curve"]:
            ax.plot(*zip(*j["curve"]), marker="o", label=f"{j['job']}: {' '.join(j['varied'])[:60]}")
    ax.set(title=f"{sweep.name}: validation loss (best first)", xlabel="step", ylabel="val_loss")
    ax.grid(alpha=0.3)
    if any(j["curve"] for j in jobs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sweep / "val_loss.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        raise SystemExit(f"stabletrain: error: {args.sweep} is not a directory")
    jobs = summarize(args.sweep)
    if not jobs:
        raise SystemExit(f"stabletrain: error: {args.sweep} holds no job directories")
    write(args.sweep, jobs)
    print((args.sweep / "summary.md").read_text())
    print(f"wrote {args.sweep / 'summary.md'}, summary.csv and val_loss.png")


if __name__ == "__main__":
    main()
