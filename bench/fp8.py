"""FP8 throughput: tokens/s of precision=fp8 with each backend against bf16, side by side in one process.

    .venv/bin/python bench/fp8.py                                            # CPU defaults below
    .venv/bin/python bench/fp8.py trainer.device=cuda model.d_model=2048 model.n_heads=16 model.n_layers=16 \
        data.seq_len=2048 --variants bf16,scaled_mm,torchao_rowwise,torchao_tensorwise

Every variant is a Trainer built as train.py builds it (same model, seed and batches); timed blocks alternate
between the variants and the median over repeats is reported, with each variant's ratio to bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.throughput import compose_config, timed  # noqa: E402
from stabletrain.config import to_container, to_object, validate  # noqa: E402
from stabletrain.models import param_count  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

DEFAULTS = ["model.d_model=256", "model.n_heads=4", "model.n_layers=4", "data.seq_len=256",
            "trainer.micro_batch_size=8"]  # fmt: skip
VARIANTS = {
    "bf16": ["precision=bf16"],
    "emulate": ["precision=fp8", "precision.fp8.backend=emulate"],
    "scaled_mm": ["precision=fp8", "precision.fp8.backend=scaled_mm"],
    "torchao_rowwise": ["precision=fp8", "precision.fp8.backend=torchao", "precision.fp8.recipe=rowwise"],
    "torchao_tensorwise": ["precision=fp8", "precision.fp8.backend=torchao", "precision.fp8.recipe=tensorwise"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    # torchao on CPU: a process holding several trainers stalled in this session; measure it on a GPU, alone.
    p.add_argument("--variants", default="bf16,emulate,scaled_mm")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/fp8.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    torch.set_flush_denormal(True)
    names = args.variants.split(",")
    trainers, tmp = {}, tempfile.TemporaryDirectory(prefix="stabletrain-bench-")
    try:
        for name in names:
            dcfg = compose_config([*DEFAULTS, *VARIANTS[name], *args.overrides])
            cfg = to_object(dcfg)
            validate(cfg)
            trainers[name] = Trainer(cfg, Path(tmp.name) / name, to_container(dcfg))
        steps = {n: (lambda t=t: t.train_step().metrics["loss"]) for n, t in trainers.items()}
        for fn in steps.values():
            timed(fn, args.warmup)
        walls: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for n, fn in steps.items():
                walls[n].append(timed(fn, args.steps)[0])
    finally:
        for t in trainers.values():
            t.close()
        tmp.cleanup()
    cfg = trainers[names[0]].cfg
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len * args.steps
    tps = {n: statistics.median(tokens / w for w in walls[n]) for n in names}
    base = tps.get("bf16", next(iter(tps.values())))
    result = {"date": datetime.date.today().isoformat(), "device": str(trainers[names[0]].device),
              "overrides": [*DEFAULTS, *args.overrides], "params": param_count(cfg.model), "tokens_per_s": tps,
              "ratio_to_bf16": {n: v / base for n, v in tps.items()}}  # fmt: skip
    print(f"{result['date']}  {result['device']}  {result['params']:,} parameters  {' '.join(result['overrides'])}")
    for n in names:
        print(f"  {n:<20} {tps[n]:>10,.0f} tokens/s   x{tps[n] / base:.3f} vs bf16")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
