"""The command-line shell shared by the run-directory reports: runs in, report.md and a PNG out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from stabletrain.monitoring.plots import finite


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows; a torn line (a crash mid-write) is skipped and NaN/Inf strings become floats."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: finite([v])[0] if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return rows


def report_main(
    description: str, load: Callable, table: Callable, plot: Callable, png: str, argv: list[str] | None = None
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the plot")
    args = parser.parse_args(argv)
    runs = [load(d) for d in args.runs if (d / "metrics.jsonl").is_file()]
    if not runs:
        parser.error("none of the given directories has a metrics.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(table(runs))
    plot(runs, args.out / png)
    print(table(runs))
    print(f"wrote {args.out / 'report.md'} and {args.out / png}")
