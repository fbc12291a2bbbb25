"""Run several training jobs one after another inside one torchrun launch (one process group), so that tests of
multi-rank layouts pay the process start-up and the DeepSpeed import once instead of once per configuration.

    torchrun --nproc_per_node 2 -m tests.dist_jobs JOBS.json     # [{"run_dir": ..., "overrides": [...]}, ...]

Each job runs as `train.py <overrides> hydra.run.dir=<run_dir>` would (stabletrain.cli.train.run); a job that
exits (a user error, a signal) writes its exit status to <run_dir>/exit_status and the next job starts. A job with
"before": ["module:function", *args] has rank 0 call that function first while the other ranks wait. What each
rank printed goes to <run_dir>/stdout_rank<r>.log as well. A job with "dump_init": true builds the trainer only and
writes each rank's initial weights, under the unsharded model's names, to <run_dir>/init_rank<r>.pt.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import signal
import sys
from pathlib import Path

import deepspeed
import torch
from hydra import compose, initialize_config_dir

from stabletrain.cli import CONFIG_DIR, setup
from stabletrain.cli.train import run
from stabletrain.config import to_container, to_object, validate
from stabletrain.distributed import STOP_SIGNALS, barrier, rank, setup_device
from stabletrain.training.trainer import Trainer


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def initial_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """What this rank materialized, in fp32, whole (ZeRO-3 shards gathered), under the unsharded model's names."""
    own = [(n, p) for n, p in trainer.model.named_parameters() if not p.is_meta]
    gather = trainer.cfg.engine.zero_stage == 3
    with deepspeed.zero.GatheredParameters([p for _, p in own]) if gather else contextlib.nullcontext():
        out = {n: p.detach().float().clone() for n, p in own}
    if trainer.engine.experts is not None:
        out.update({n: p.detach().float().clone() for n, p in trainer.engine.experts.live.items()})
    return out


def dump_initial_weights(cfg, run_dir: Path) -> None:
    typed = to_object(cfg)
    validate(typed)
    trainer = Trainer(typed, run_dir, to_container(cfg))
    torch.save(initial_weights(trainer), run_dir / f"init_rank{rank()}.pt")
    trainer.close()


def main(jobs_file: str) -> None:
    setup()
    for job in json.loads(Path(jobs_file).read_text()):
        if job.get("before"):
            target, *args = job["before"]
            module, name = target.split(":")
            setup_device()  # the process group, for the barrier (the first job may not have formed it yet)
            if rank() == 0:
                getattr(importlib.import_module(module), name)(*args)
            barrier()
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=job["overrides"])
        status, handlers = 0, {s: signal.getsignal(s) for s in STOP_SIGNALS}  # a signal-stopped job ignores more
        with open(run_dir / f"stdout_rank{rank()}.log", "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)):
            try:
                dump_initial_weights(cfg, run_dir) if job.get("dump_init") else run(cfg, run_dir)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            finally:
                for s, handler in handlers.items():
                    signal.signal(s, handler)
        if rank() == 0:
            (run_dir / "exit_status").write_text(str(status))


if __name__ == "__main__":
    main(sys.argv[1])
