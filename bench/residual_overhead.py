"""Step time of each residual-stream variant relative to the baseline, measured side by side in one process.

    .venv/bin/python bench/residual_overhead.py                                  # CPU: d=512, 8 layers
    .venv/bin/python bench/residual_overhead.py --variants baseline mhc --steps 5 model.d_model=2048 ...

Each variant is a full stabletrain Trainer (DeepSpeed engine, real data); timed blocks rotate through the
variants `--repeats` times and the median step time per variant is reported with its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from throughput import compose_config, timed  # noqa: E402

from stabletrain.config import to_container, to_object, validate  # noqa: E402
from stabletrain.models import param_count  # noqa: E402
from stabletrain.models.residual import ResidualStream  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

VARIANTS = {
    "baseline": ["model=baseline"],
    "hc": ["model=hc"],
    "mhc": ["model=mhc"],
    "mhc_fused": ["model=mhc", "model.residual.kernel=fused"],
    # The fused kernels as the per-sublayer interface ran them: each write and read separately (for before/after).
    "mhc_fused_per_sublayer": ["model=mhc", "model.residual.kernel=fused"],
    "baseline_compiled": ["model=baseline", "trainer.compile=true"],
    "mhc_compiled": ["model=mhc", "model.residual.kernel=fused", "trainer.compile=true"],
    "lns": ["model=lns"],
}
SIZE = ["model.d_model=512", "model.n_heads=8", "model.n_layers=8", "monitor.gain_interval=0"]


def per_sublayer(trainer: Trainer) -> None:
    """Run every block through the reference per-sublayer loop (the fused read and write kernels, but no fusion
    across a sublayer boundary): what kernel=fused did before the stream owned whole blocks."""
    stream = trainer.model.stream
    for block in trainer.model.blocks:
        block.run_block = lambda x, subs: ResidualStream.block(stream, stream.materialize(x), subs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant (after the d=512 size)")
    args = p.parse_intermixed_args()
    torch.set_flush_denormal(True)
    wall0 = time.perf_counter()
    trainers, tmp = {}, tempfile.TemporaryDirectory(prefix="stabletrain-bench-")
    try:
        for name in args.variants:
            dcfg = compose_config(VARIANTS[name] + SIZE + args.overrides)
            cfg = to_object(dcfg)
            validate(cfg)
            trainers[name] = Trainer(cfg, Path(tmp.name) / name, to_container(dcfg))
            if name == "mhc_fused_per_sublayer":
                per_sublayer(trainers[name])
            timed(lambda t=trainers[name]: t.train_step().metrics["loss"], args.warmup)
        times = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                times[name].append(timed(lambda t=trainer: t.train_step().metrics["loss"], args.steps)[0] / args.steps)
    finally:
        for t in trainers.values():
            t.close()
        tmp.cleanup()

    base = statistics.median(times[args.variants[0]])
    any_cfg = next(iter(trainers.values())).cfg
    print(
        f"\n{datetime.datetime.now().isoformat(timespec='seconds')}  device {next(iter(trainers.values())).device}"
        f"  torch {torch.__version__}  threads {torch.get_num_threads()}  precision {any_cfg.precision.dtype}"
    )
    print(
        f"  d_model {any_cfg.model.d_model}, {any_cfg.model.n_layers} layers, seq {any_cfg.data.seq_len}, "
        f"micro batch {any_cfg.trainer.micro_batch_size}; {args.repeats} x {args.steps} timed steps per variant"
    )
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "overrides": args.overrides,
        "variants": {},
    }
    print(f"  {'variant':<10} {'params':>12} {'step s':>9} {'vs ' + args.variants[0]:>12}")
    for name, trainer in trainers.items():
        med = statistics.median(times[name])
        result["variants"][name] = {
            "params": param_count(trainer.cfg.model),
            "step_s": med,
            "ratio": med / base,
            "all_step_s": times[name],
        }
        print(f"  {name:<10} {param_count(trainer.cfg.model):>12,} {med:>9.3f} {med / base:>11.3f}x")
    print(f"  wall time {time.perf_counter() - wall0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
