"""Training-step throughput: stabletrain's Trainer.train_step against a bare PyTorch loop, in one process.

    .venv/bin/python bench/throughput.py                                   # defaults below
    .venv/bin/python bench/throughput.py model.d_model=512 model.n_layers=8 --steps 10 --repeats 2

Both sides train the same model (same seed), with the same AdamW param groups, LambdaLR schedule, gradient
clipping and batches. Timed blocks alternate (framework, bare, framework, ...) to cancel thermal/clock drift;
the reported tokens/s is the median over repeats. The bare loop mirrors fp32 ZeRO-0 (plain torch AdamW; bf16 autocast
over fp32 weights when precision=bf16), so the ratio is like-for-like for precision=fp32 engine=zero0.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from stabletrain.cli import setup  # noqa: E402
from stabletrain.config import grad_accum_steps, to_container, to_object, validate  # noqa: E402
from stabletrain.data.loader import RankLoader  # noqa: E402
from stabletrain.data.order import GlobalOrder  # noqa: E402
from stabletrain.models import meta_model, param_count  # noqa: E402
from stabletrain.optim import lr_multiplier, param_groups  # noqa: E402
from stabletrain.parallel.compile import compile_blocks  # noqa: E402
from stabletrain.parallel.materialize import materialize  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

DEFAULT_OVERRIDES = ["logging=none", "trainer.micro_batch_size=8", "data.seq_len=256", "trainer.eval_interval=0"]


def compose_config(overrides: list[str]):
    """Hydra compose with our defaults; a key the user overrides replaces the default for it."""
    setup()
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    merged = [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in user_keys] + overrides
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=merged)


class BareLoop:
    """The same training step written as a plain PyTorch loop: the same initial weights (materialized as the trainer
    does, on its device), fp32 weights under bf16 autocast when the run is bf16, torch AdamW (fused on a GPU), the
    same clipping, schedule and batches, compiled blocks when the trainer compiled its own; one host read per step."""

    def __init__(self, cfg, trainer: Trainer):
        t, o = cfg.trainer, cfg.optim
        self.model = meta_model(cfg.model)
        materialize(self.model, trainer.device, t.seed)
        self.model.train()
        if trainer.parallel.compiled:
            compile_blocks(self.model)
        fused = trainer.device.type == "cuda" or None
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps, fused=fused)  # fmt: skip
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, functools.partial(lr_multiplier, cfg=cfg))
        # Same sample order over the same packed corpus: batch k here is batch k of the trainer.
        self.loader = RankLoader(
            trainer.data.train,
            GlobalOrder(len(trainer.data.train), t.seed),
            t.micro_batch_size,
            grad_accum_steps(cfg, 1),
            0,
            1,
        )
        self.accum, self.clip, self.device = grad_accum_steps(cfg, 1), o.grad_clip or math.inf, trainer.device
        self.autocast = cfg.precision.dtype == "bf16"

    def step(self) -> float:
        total = torch.zeros((), device=self.device)
        for batch in self.loader.next_batch():
            batch = batch.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(batch[:, :-1], batch[:, 1:])
            (loss / self.accum if self.accum > 1 else loss).backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total) / self.accum  # the one host sync, as the framework's step


def timed(fn, steps: int) -> tuple[float, float, float]:
    """(wall seconds for `steps` calls of fn, CPU busy fraction of the torch threads, value of the last call).

    A CPU busy fraction well below 1 means another process took cores during the block: its time is suspect.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        last = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - c0) / (wall * torch.get_num_threads()), last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side, once at the start")
    p.add_argument("--repeats", type=int, default=3, help="alternating framework/bare blocks")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.d_model=512")
    args = p.parse_intermixed_args()
    wall0 = time.perf_counter()
    torch.set_flush_denormal(True)

    # Framework side, built exactly as stabletrain.cli.train.run does (minus fit()).
    dcfg = compose_config(args.overrides)
    cfg = to_object(dcfg)
    validate(cfg)
    resolved = to_container(dcfg)
    with tempfile.TemporaryDirectory(prefix="stabletrain-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), resolved)  # sets cfg.model.vocab_size from the tokenizer
        try:
            bare = BareLoop(cfg, trainer)
            fw_step = lambda: trainer.train_step().metrics["loss"]  # noqa: E731
            timed(fw_step, args.warmup)
            timed(bare.step, args.warmup)
            fw_s, bare_s, busy = [], [], []
            for _ in range(args.repeats):
                dt, b1, fw_loss = timed(fw_step, args.steps)
                fw_s.append(dt)
                dt, b2, bare_loss = timed(bare.step, args.steps)
                bare_s.append(dt)
                busy += [b1, b2]
        finally:
            trainer.close()

    t = cfg.trainer
    accum = grad_accum_steps(cfg, 1)
    tokens_per_step = t.micro_batch_size * accum * cfg.data.seq_len
    fw_tps = [args.steps * tokens_per_step / s for s in fw_s]
    bare_tps = [args.steps * tokens_per_step / s for s in bare_s]
    fw_med, bare_med = statistics.median(fw_tps), statistics.median(bare_tps)
    # Adjacent blocks share most of the machine's drift, so the per-repeat ratio is the steadier statistic.
    paired = statistics.median(f / b for f, b in zip(fw_tps, bare_tps))
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(trainer.device),
        "overrides": args.overrides,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "params": param_count(cfg.model),
        "seq_len": cfg.data.seq_len,
        "micro_batch": t.micro_batch_size,
        "grad_accum": accum,
        "precision": cfg.precision.dtype,
        "zero_stage": cfg.engine.zero_stage,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tokens_per_step": tokens_per_step,
        "framework_tokens_per_s": fw_tps,
        "bare_tokens_per_s": bare_tps,
        "framework_tokens_per_s_median": fw_med,
        "bare_tokens_per_s_median": bare_med,
        "ratio": fw_med / bare_med,
        "paired_ratio_median": paired,
        "final_loss": {"framework": fw_loss, "bare": bare_loss},  # same data, same steps: should agree
        "min_cpu_busy": min(busy),
        "wall_s": time.perf_counter() - wall0,
    }

    print(f"\n{result['date']}  cpu: {result['cpu']} ({result['cpu_count']} cores)  torch {result['torch']}")
    rows = [
        ("d_model", cfg.model.d_model),
        ("n_layers", cfg.model.n_layers),
        ("params", f"{result['params']:,}"),
        ("seq_len", cfg.data.seq_len),
        ("micro batch", f"{t.micro_batch_size} x accum {accum}"),
        ("precision", cfg.precision.dtype),
        ("zero stage", cfg.engine.zero_stage),
        ("torch threads", result["torch_threads"]),
        ("steps", f"{args.warmup} warmup + {args.repeats} x {args.steps} timed per side"),
        ("tokens/s framework", f"{fw_med:,.0f}  (" + ", ".join(f"{x:,.0f}" for x in fw_tps) + ")"),
        ("tokens/s bare", f"{bare_med:,.0f}  (" + ", ".join(f"{x:,.0f}" for x in bare_tps) + ")"),
        ("ratio framework/bare", f"{result['ratio']:.3f}  (median of per-repeat ratios: {paired:.3f})"),
        ("final loss fw / bare", f"{fw_loss:.6f} / {bare_loss:.6f}"),
        ("min CPU busy", f"{min(busy):.0%} of {torch.get_num_threads()} threads (per timed block)"),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if cfg.precision.dtype != "fp32" or cfg.engine.zero_stage != 0:
        print("  note: the bare loop is fp32 torch AdamW; this ratio is not like-for-like")
    if min(busy) < 0.9 and trainer.device.type == "cpu":
        print("  warning: some blocks ran with idle torch threads (other processes on the cores?); rerun when quiet")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
