"""Regenerate the golden per-step numbers (only when a change is meant to move them; say so in the commit):

    .venv/bin/python -m tests.golden.regenerate

Each golden is a 20-step fp32 CPU run of the TINY model on the bundled corpus; tests/test_golden.py compares a
fresh run's per-step losses and gradient norms with the stored ones at rel 1e-5.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent
STEPS = 20
THREADS = 2  # CPU matmuls block differently per thread count: goldens are made and checked with this many
VARIANTS = {
    "baseline": ["model=baseline"],
    "mhc": ["model=mhc"],
    "hc": ["model=hc"],
    "lns": ["model=lns"],
    "moe_aux_free": ["model=moe"],
}
COMMON = [f"trainer.max_steps={STEPS}", "trainer.eval_interval=0", "trainer.ckpt_interval=0", "monitor.gain_interval=0"]


def run_variant(name: str, run_dir: Path) -> dict:
    from tests.helpers import train_inprocess

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        rows = train_inprocess(run_dir, *VARIANTS[name], *COMMON)
    finally:
        torch.set_num_threads(threads)
    return {
        "overrides": VARIANTS[name] + COMMON,
        "loss": [r["loss"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
    }


def main(names: list[str]) -> None:
    for name in names or list(VARIANTS):
        with tempfile.TemporaryDirectory() as tmp:
            record = run_variant(name, Path(tmp) / name)
        (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: final loss {record['loss'][-1]:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:])
