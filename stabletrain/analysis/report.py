"""The command-line shell shared by the run-directory reports: runs in, report.md and a PNG out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from stabletrain.monitoring.plots import finite


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl or events.jsonl ([] when missing); a torn line (a crash mid-write) is
    skipped and NaN/Inf strings become floats."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: finite([v])[0] if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return rows


def count_events(events: list[dict], kind: str) -> int:
    return sum(1 for e in events if e.get("kind") == kind)


def markdown_table(head: list, rows: list[list]) -> str:
    """A markdown table; a "|" inside a cell is escaped."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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
