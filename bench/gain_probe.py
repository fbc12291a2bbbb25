"""The cost of a gain-probe step (monitor.gain_interval) as a multiple of a plain training step.

    .venv/bin/python bench/gain_probe.py                          # HC and mHC, 12 blocks of d=64 (the tiny shape)
    .venv/bin/python bench/gain_probe.py --variants mhc --steps 10 model.n_layers=24

For each variant one Trainer runs probe steps (the gains callback's on_step_begin, the training step, its
on_step_end: norms at every block boundary, gradient hooks, the composite Amax products) and plain steps (the
training step alone) in alternating blocks; the report gives the median time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from throughput import compose_config  # noqa: E402

from stabletrain.config import to_container, to_object, validate  # noqa: E402
from stabletrain.monitoring.gains import GainMonitor  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

VARIANTS = {"hc": ["model=hc"], "mhc": ["model=mhc"]}
SIZE = ["model.d_model=64", "model.n_heads=2", "model.n_layers=12", "data.seq_len=64", "trainer.micro_batch_size=8",
        "monitor.gain_interval=0"]  # fmt: skip


def step_times(trainer: Trainer, probe: bool, steps: int) -> list[float]:
    monitor, out = GainMonitor(interval=1), []
    for _ in range(steps):
        t0 = time.perf_counter()
        if probe:
            monitor.on_step_begin(trainer, trainer.step + 1)
        metrics = trainer.train_step().metrics
        if probe:
            monitor.on_step_end(trainer, trainer.step, metrics)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=4, help="alternating probe/plain blocks")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant (after the tiny size)")
    args = p.parse_intermixed_args()
    with tempfile.TemporaryDirectory(prefix="stabletrain-bench-") as tmp:
        for name in args.variants:
            dcfg = compose_config(VARIANTS[name] + SIZE + ["logging=none", "logging.progress=false", *args.overrides])
            cfg = to_object(dcfg)
            validate(cfg)
            trainer = Trainer(cfg, Path(tmp) / name, to_container(dcfg))
            try:
                step_times(trainer, True, 2)  # warm-up, both kinds
                times = {True: [], False: []}
                for _ in range(args.repeats):
                    for probe in (True, False):
                        times[probe] += step_times(trainer, probe, args.steps)
            finally:
                trainer.close()
            probe, plain = statistics.median(times[True]), statistics.median(times[False])
            m = cfg.model
            print(f"{name} (d_model {m.d_model}, {m.n_layers} blocks, {torch.get_num_threads()} thread(s)): probe "
                  f"step {1e3 * probe:.1f} ms, plain step {1e3 * plain:.1f} ms, ratio {probe / plain:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
