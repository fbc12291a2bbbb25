"""Asynchronous checkpoints: what a save blocks the step for, synchronous against trainer.ckpt_async=true, side by
side in one process; and kill -9 during the background write, then trainer.resume=auto, against an uninterrupted run.

    .venv/bin/python bench/ckpt_async.py blocking --saves 3              # d=512, 8 layers (docs/checkpoints.md)
    .venv/bin/python bench/ckpt_async.py kill --trials 10                # 10 kills, each resumed and compared

A kill trial trains with a checkpoint every 5 steps and the writer slowed (STABLETRAIN_CKPT_WRITE_DELAY_S) so that the
kill lands while it writes; the resumed run's per-step losses must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.throughput import compose_config  # noqa: E402
from stabletrain.checkpoint.background import DELAY_ENV  # noqa: E402
from stabletrain.config import to_container, to_object, validate  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64", "trainer.micro_batch_size=8",
        "trainer.eval_interval=0", "logging=none", "logging.progress=false"]  # fmt: skip


def blocking(saves: int) -> dict:
    """Median seconds a save blocks: synchronous vs asynchronous, alternating, on one d=512 8-layer model each."""
    over = ["model.d_model=512", "model.n_heads=8", "model.n_layers=8", "logging=none", "trainer.eval_interval=0"]
    out: dict[str, list[float]] = {"sync": [], "async": [], "async_total": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for mode in ("sync", "async"):
            dcfg = compose_config([*over, f"trainer.ckpt_async={mode == 'async'}"])
            cfg = to_object(dcfg)
            validate(cfg)
            trainers[mode] = Trainer(cfg, Path(tmp) / mode, to_container(dcfg))
            trainers[mode].train_step()
        for _ in range(saves):
            for mode, t in trainers.items():
                rows = []
                t.log = rows.append
                t0 = time.perf_counter()
                t.save()
                out[mode].append(time.perf_counter() - t0)
                if mode == "async":
                    t.saver.wait()
                    out["async_total"].append(next(r["ckpt/save_s"] for r in rows if "ckpt/save_s" in r))
                t.step += 1
        size = sum(p.stat().st_size for p in (Path(tmp) / "sync/checkpoints").rglob("*") if p.is_file()) / saves
        for t in trainers.values():
            t.close()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "median_s": med,
        "all_s": out,
        "checkpoint_bytes": size,
        "ratio_async_blocking_to_sync": med["async"] / med["sync"],
    }


def _run(run_dir: Path, *extra: str, delay: float = 0.0, kill_after: float | None = None) -> int:
    env = dict(os.environ, WANDB_MODE="offline", **{DELAY_ENV: str(delay)})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STABLETRAIN_RUN_STAMP"):
        env.pop(var, None)  # a process group of the caller's (a test's in-process run) is not this run's
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "trainer.ckpt_interval=5", "trainer.ckpt_async=true",
           f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is None:
        return proc.wait(timeout=600)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill while a save is being written
        if any((run_dir / "checkpoints").glob("step_*/SAVE_IN_PROGRESS")) and time.time() > kill_after:
            time.sleep(random.uniform(0.0, delay))
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=60)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill(trials: int, seed: int) -> dict:
    random.seed(seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference"
        _run(ref, "trainer.max_steps=30")
        want = losses(ref)
        for i in range(trials):
            run = Path(tmp) / f"trial{i}"
            status = _run(run, "trainer.max_steps=30", delay=0.3, kill_after=time.time() + random.uniform(1, 4))
            _run(run, "trainer.max_steps=30", "trainer.resume=auto")
            got = losses(run)
            results.append({"killed": status == -signal.SIGKILL, "exact": got == want})
    return {"trials": trials, "killed": sum(r["killed"] for r in results),
            "exact": sum(r["exact"] and r["killed"] for r in results), "results": results}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["blocking", "kill"])
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    result = blocking(args.saves) if args.what == "blocking" else kill(args.trials, args.seed)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
