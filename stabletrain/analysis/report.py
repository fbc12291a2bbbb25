"""The command-line shell shared by the run-directory reports: runs in, report.md and a PNG out."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def report_main(description: str, load: Callable, table: Callable, plot: Callable, png: str,
                argv: list[str] | None = None) -> None:
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
