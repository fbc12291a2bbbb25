"""Random byte flips in a checkpoint: is each one detected, and does the resume fall back exactly?

python bench/checkpoint_flips.py --flips 50 --seed 0

Trains the tiny model for 8 steps once, with checkpoints at steps 2, 4, 6 and 8 (the uninterrupted reference).
Each trial takes a fresh copy of that run without step 8 (step 6 is then the newest checkpoint), XORs one byte of
one file of step_00000006 (the files in turn, its manifest included; the offset uniform in the file) with a random
non-zero value, and resumes the copy with trainer.resume=auto up to step 8. A flip is detected when the resume rejects
step_00000006 (a `checkpoint_rejected` event); a fallback is exact when the resumed run's losses of steps 5-8 equal
the uninterrupted run's bit for bit. An undetected flip is harmless when the losses of steps 7-8 still equal the
reference, silent corruption when they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from stabletrain.cli import CONFIG_DIR, setup  # noqa: E402
from stabletrain.cli.train import run  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64", "trainer.micro_batch_size=8",
        "trainer.eval_batches=2", "optim.warmup_steps=2", "optim.lr=3e-3", "logging.progress=false", "logging=none",
        "trainer.max_steps=8", "trainer.ckpt_interval=2", "trainer.keep_checkpoints=0",
        "trainer.eval_interval=0"]  # fmt: skip
FLIPPED = "step_00000006"


def train(run_dir: Path, *overrides: str) -> int:
    """`python train.py TINY <overrides> hydra.run.dir=<run_dir>`, in this process, quietly; the exit status."""
    setup()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            run(cfg, run_dir)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    return 0


def read(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read(run_dir, "metrics.jsonl") if "loss" in r}


def flip_one(tag: Path, index: int, rng: random.Random) -> tuple[str, int]:
    """XOR one byte of the checkpoint's file number `index` (round robin, so that the small files get flips too:
    by bytes, the model file would take nearly all) at a uniform offset with a non-zero value; (file, offset)."""
    files = sorted(p for p in tag.iterdir() if p.is_file())
    path = files[index % len(files)]
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return path.name, at


def trial(reference: Path, work: Path, index: int, rng: random.Random) -> dict:
    shutil.copytree(reference, work)
    shutil.rmtree(work / "checkpoints" / "step_00000008")
    name, offset = flip_one(work / "checkpoints" / FLIPPED, index, rng)
    status = train(work, "trainer.resume=auto")
    events = read(work, "events.jsonl")
    detected = any(e["kind"] == "checkpoint_rejected" and e["checkpoint"].endswith(FLIPPED) for e in events)
    resumed = [e["step"] for e in events if e["kind"] == "resume"]
    ref, got = losses(reference), losses(work)
    first = 5 if detected else 7
    exact = status == 0 and all(got.get(s) == ref[s] for s in range(first, 9))
    return {"file": name, "offset": offset, "status": status, "detected": detected,
            "resumed_from": resumed[-1] if resumed else None, "exact": exact}  # fmt: skip


def run_trials(root: Path, flips: int, seed: int) -> dict:
    """The reference run and `flips` trials under root; the counts and every trial."""
    t0 = time.perf_counter()
    reference = root / "reference"
    if train(reference) != 0:
        raise SystemExit(f"the reference run failed (see {reference})")
    rng, trials = random.Random(seed), []
    for i in range(flips):
        trials.append(trial(reference, root / f"trial_{i:03d}", i, rng))
        shutil.rmtree(root / f"trial_{i:03d}")
    detected = [t for t in trials if t["detected"]]
    return {
        "flips": flips,
        "seed": seed,
        "detected": len(detected),
        "exact_fallbacks": sum(t["exact"] for t in detected),
        "undetected_harmless": sum(t["exact"] for t in trials if not t["detected"]),
        "undetected_silent": sum(not t["exact"] for t in trials if not t["detected"]),
        "files_hit": {f: sum(t["file"] == f for t in trials) for f in sorted({t["file"] for t in trials})},
        "seconds": round(time.perf_counter() - t0, 1),
        "trials": trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result (with every trial) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_trials(Path(tmp), args.flips, args.seed)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "trials"}
    print(json.dumps(summary, indent=1))
    for t in result["trials"]:
        if not (t["detected"] and t["exact"]):
            print(f"not a detected, exact fallback: {t}")


if __name__ == "__main__":
    main()
