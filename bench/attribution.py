"""Per-document spike attribution: plant one poisoned document (a long run of random characters) in a local corpus,
drive a spike on a batch that holds it, and count how often the forensics report ranks it first.

    .venv/bin/python bench/attribution.py --trials 20            # docs/spikes.md

Each trial: the bundled plays with the poisoned document inserted at a random position, a random seed; the bench
finds the first global batch from 16 on whose rows hold the poisoned document, trains 15 steps, jumps to that batch
(trainer.skip_batches) and injects a loss spike on it (monitor.inject.steps=[16]); the spike's forensics ranks the
batch's documents by their contribution to its loss (stabletrain.monitoring.attribution).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.throughput import compose_config  # noqa: E402
from stabletrain.config import to_object  # noqa: E402
from stabletrain.data.build import build_data  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64", "trainer.micro_batch_size=8",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logging=none", "logging.progress=false",
        "trainer.eval_interval=0"]  # fmt: skip
PLAYS = REPO / "data/shakespeare/train.jsonl"
SPIKE_STEP = 16


def poisoned_corpus(path: Path, position: int, rng: random.Random) -> None:
    docs = [json.loads(line) for line in PLAYS.read_text().splitlines() if line.strip()]
    noise = "".join(rng.choice(string.ascii_letters + string.digits + "  ") for _ in range(3000))
    docs.insert(position, {"id": "poison", "text": noise})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def data_overrides(corpus: Path, tokenizer: Path) -> list[str]:
    # The plays' own tokenizer, and the held-out plays for validation (no document held out of this file).
    return ["data=local", f"data.path={corpus}", f"data.tokenizer.path={tokenizer}",
            f"data.source.val_files=[{REPO / 'data/shakespeare/val.jsonl'}]"]  # fmt: skip


def target_batch(overrides: list[str], position: int) -> int:
    """The first global batch >= SPIKE_STEP - 1 whose rows hold document `position`."""
    cfg = to_object(compose_config(overrides))
    data = build_data(cfg.data, cfg.trainer.seed, True)
    G = cfg.trainer.micro_batch_size
    for g in range((SPIKE_STEP - 1) * G, len(data.train)):
        _, docs = data.documents([int(data.order(np.array([g]))[0])])
        if (docs == position).any():
            return g // G
    raise RuntimeError("the poisoned document is in no batch of the first epoch")


def trial(tmp: Path, seed: int, rng: random.Random, tokenizer: Path) -> dict:
    position = rng.randrange(0, 40)
    corpus = tmp / f"corpus{seed}.jsonl"
    poisoned_corpus(corpus, position, rng)
    overrides = [*TINY, *data_overrides(corpus, tokenizer), f"trainer.seed={seed}"]
    batch = target_batch(overrides, position)
    run = tmp / f"run{seed}"
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"trainer.max_steps={SPIKE_STEP}",
           "monitor.warmup_steps=10", f"monitor.inject.steps=[{SPIKE_STEP}]", "monitor.inject.scale=30",
           f"hydra.run.dir={run}"]  # fmt: skip
    if batch > SPIKE_STEP - 1:  # jump straight to the batch that holds the poisoned document
        cmd.append(f"trainer.skip_batches=[[{SPIKE_STEP - 1},{batch}]]")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "STABLETRAIN_RUN_STAMP")}  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    ranked = json.loads((run / f"spikes/{SPIKE_STEP}/forensics.json").read_text())["documents"]
    first = ranked[0]
    return {"seed": seed, "position": position, "batch": batch, "first": [first["source"], first["record"]],
            "rank": next((i + 1 for i, d in enumerate(ranked) if d["record"] == position), None),
            "hit": first["record"] == position}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng, t0 = random.Random(args.seed), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # A copy of the plays' tokenizer: each corpus's token cache goes next to it, in this scratch directory.
        tokenizer = Path(tmp) / "tokenizer/plays.model"
        tokenizer.parent.mkdir()
        tokenizer.write_bytes(next((REPO / "data/shakespeare/tokenizer").glob("sp4096-*.model")).read_bytes())
        results = [trial(Path(tmp), args.seed * 1000 + i, rng, tokenizer) for i in range(args.trials)]
    summary = {"trials": args.trials, "ranked_first": sum(r["hit"] for r in results),
               "wall_s": time.perf_counter() - t0, "results": results}  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
