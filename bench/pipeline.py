"""Pipeline stages against data parallelism, and activation checkpointing's time against its memory, side by side.

    .venv/bin/python bench/pipeline.py                       # CPU: 2 ranks of 1 thread each
    .venv/bin/python bench/pipeline.py --device cuda         # a GPU machine (2 GPUs for the layouts)

1. Layouts on 2 ranks at the same global batch, 8 micro-batches per pipeline: data parallel (ZeRO-1, 2 replicas x
   4 accumulation steps) and a 2-stage pipeline (1 replica, 8 micro-batches through 1F1B). The pipeline's step
   time over data parallel's, against the ideal (m + P - 1) / m of a 1F1B schedule with a bubble of
   (P - 1) / (m + P - 1).
2. Activation checkpointing none | selective | block in one process: median step time and peak memory
   (`mem/peak_gib`: the resident set's high-water mark on CPU, with a fixed glibc mmap threshold so that freed
   tensors leave it; max_memory_allocated on a GPU), and the planner's predicted activation memory.

Each run is train.py itself (the framework's own step); the median step time skips the first two steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.throughput import compose_config  # noqa: E402
from stabletrain.config import to_object  # noqa: E402
from stabletrain.planner.report import configured_layout  # noqa: E402
from stabletrain.planner.search import GiB, ModelProfile, estimate  # noqa: E402

MODEL = ["model=mhc", "model.d_model=256", "model.n_layers=8", "model.n_heads=4", "data.seq_len=256"]
COMMON = ["logging=none", "trainer.eval_interval=0", "trainer.ckpt_interval=0", "logging.progress=false"]
LAYOUTS = {  # 2 ranks, global batch 16 sequences
    "data_parallel": ["engine=zero1", "trainer.micro_batch_size=2", "trainer.global_batch_size=16"],
    "pipeline_2": ["engine=zero1", "engine.pipeline_stages=2", "trainer.micro_batch_size=2",
                   "trainer.global_batch_size=16"],
}  # fmt: skip
MICRO_BATCHES, STAGES = 8, 2


def run(run_dir: Path, overrides: list[str], nproc: int, env: dict) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    script = [str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), *script]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def median_step(rows: list[dict]) -> float:
    return statistics.median(r["step_time_s"] for r in rows[2:])


def report_layouts(result: dict) -> None:
    lay = result["layouts"]
    ratio = lay["pipeline_2"]["step_s"] / lay["data_parallel"]["step_s"]
    ideal = (MICRO_BATCHES + STAGES - 1) / MICRO_BATCHES
    result["pipeline_over_data_parallel"], result["ideal_1f1b_ratio"] = ratio, ideal
    print(f"pipeline (2 stages, 8 micro-batches) / data parallel (2 replicas): step time x{ratio:.3f} "
          f"(ideal 1F1B x{ideal:.3f}, bubble {(STAGES - 1) / (MICRO_BATCHES + STAGES - 1):.1%})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="layouts,ac", help="layouts (needs 2 ranks), ac, or both")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/pipeline.json")
    args = ap.parse_args()
    env = dict(os.environ, WANDB_MODE="offline", MALLOC_MMAP_THRESHOLD_="131072")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    base = [*MODEL, *COMMON, f"trainer.max_steps={args.steps}", f"trainer.device={args.device}"]
    result: dict = {"date": datetime.date.today().isoformat(), "host": platform.node(), "device": args.device,
                    "model": MODEL, "layouts": {}, "activation_checkpointing": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items() if "layouts" in args.parts else ():
            rows = run(Path(tmp) / name, [*base, *layout], 2, env)
            result["layouts"][name] = {"step_s": median_step(rows), "loss_last": rows[-1]["loss"]}
        for mode in ("none", "selective", "block") if "ac" in args.parts else ():
            overrides = [*base, "trainer.micro_batch_size=8", f"engine.activation_checkpointing={mode}"]
            rows = run(Path(tmp) / mode, overrides, 1, env)
            cfg = to_object(compose_config(overrides))
            predicted = estimate(ModelProfile(cfg), configured_layout(cfg), 1, 8).memory["activations"] / GiB
            result["activation_checkpointing"][mode] = {
                "step_s": median_step(rows), "peak_gib": max(r["mem/peak_gib"] for r in rows),
                "predicted_activations_gib": predicted,
            }  # fmt: skip
    lay, ac = result["layouts"], result["activation_checkpointing"]
    if lay:
        report_layouts(result)
    for mode, r in ac.items():
        dt, dm = r["step_s"] / ac["none"]["step_s"], ac["none"]["peak_gib"] - r["peak_gib"]
        dp = ac["none"]["predicted_activations_gib"] - r["predicted_activations_gib"]
        print(f"activation_checkpointing={mode}: step x{dt:.3f}, peak {r['peak_gib']:.3f} GiB "
              f"(saves {dm:.3f} GiB, planner predicts {dp:.3f})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
