"""The GPU measurements of docs/BENCHMARKS.md, one part per process (bench/gpu.sh runs them all in one call, each
under its own time limit, the slow compiles last). Every part rewrites its JSON after each timed block, so a part
stopped by its limit still leaves the numbers it had.

    python bench/gpu.py loop   --out DIR    framework train_step vs a plain PyTorch loop (16 x d2048, bf16, compiled)
    python bench/gpu.py stream --out DIR    baseline_1b vs mhc_1b: eager, compiled, Triton stream kernels; MFU and
                                            activation memory
    python bench/gpu.py fp8    --out DIR    bf16 vs torchao FP8 (rowwise, tensorwise, blockwise), all compiled
    python bench/gpu.py PART --tiny ...     the same code with tiny models on a CPU (the test suite runs this)

Variants are built side by side in one process; timed blocks of --steps steps rotate over them --repeats times;
tokens/s is the median over blocks, MFU = 6 N tokens/s / peak (989 TFLOP/s bf16 on an H100/H200). Activation memory
is the peak allocated during one step less what was allocated before it (model, gradients, optimizer states).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.throughput import BareLoop, compose_config  # noqa: E402
from stabletrain.config import to_container, to_object, validate  # noqa: E402
from stabletrain.config.schema import GPU_PEAK_TFLOPS  # noqa: E402
from stabletrain.models.residual.manifold import set_kernel  # noqa: E402
from stabletrain.training.perf import peak_flops  # noqa: E402
from stabletrain.training.trainer import Trainer  # noqa: E402

GPU = ["trainer.device=cuda", "precision=bf16", "data.seq_len=2048", "trainer.micro_batch_size=4"]
TINY = ["trainer.device=cpu", "model.d_model=64", "model.n_heads=2", "model.n_layers=2", "data.seq_len=64",
        "trainer.micro_batch_size=2", "model.vocab_size=4096"]  # fmt: skip
COMMON = ["logging=none", "trainer.eval_interval=0", "trainer.ckpt_interval=0", "monitor.gain_interval=0",
          "trainer.preflight=warn"]  # fmt: skip
LAYERS_16 = ["model=baseline_1b", "model.n_layers=16"]


@dataclass
class Variant:
    name: str
    step: Callable[[], object]  # one optimizer step
    tokens: int  # per step
    params: int  # N in 6 N (MFU)
    setup: Callable[[], None] = lambda: None  # switches what variants of one model share (compile, kernel)
    info: dict = field(default_factory=dict)


class Record:
    """The part's JSON, rewritten after every block."""

    def __init__(self, path: Path, part: str, args):
        self.path = path
        self.data = {"part": part, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "steps": args.steps, "repeats": args.repeats, "variants": {},
                     "errors": {}, "ratios": {}}  # fmt: skip
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def block(self, v: Variant, seconds: float, steps: int, act_gib: float, peak: float) -> None:
        entry = self.data["variants"].setdefault(v.name, {"params": v.params, "blocks": [], **v.info})
        tps = v.tokens * steps / seconds
        entry["blocks"].append({"s_per_step": seconds / steps, "tokens_per_s": tps, "activation_gib": act_gib})
        entry["tokens_per_s"] = statistics.median(b["tokens_per_s"] for b in entry["blocks"])
        entry["s_per_step"] = v.tokens / entry["tokens_per_s"]
        entry["mfu"] = 6 * v.params * entry["tokens_per_s"] / peak
        entry["activation_gib"] = max(b["activation_gib"] for b in entry["blocks"])
        self.save()

    def ratio(self, name: str, a: str, b: str, key: str = "s_per_step") -> None:
        """variant a over variant b (time per step: > 1 is slower; memory: > 1 is more)."""
        va, vb = self.data["variants"].get(a), self.data["variants"].get(b)
        if va and vb and vb[key]:
            self.data["ratios"][name] = va[key] / vb[key]
            self.save()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_block(v: Variant, steps: int) -> tuple[float, float]:
    """(seconds for `steps` steps, activation GiB of the first of them)."""
    v.setup()
    _sync()
    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    v.step()
    _sync()
    act = (torch.cuda.max_memory_allocated() - before) / 1024**3 if cuda else 0.0
    for _ in range(steps - 1):
        v.step()
    _sync()
    return time.perf_counter() - t0, act


def rotate(variants: list[Variant], rec: Record, args, peak: float) -> None:
    """Warm each variant up (compiles: its warm-up is recorded), then rotate timed blocks over them."""
    live = []
    for v in variants:
        try:
            t0 = time.perf_counter()
            v.setup()
            for _ in range(args.warmup):
                v.step()
            _sync()
            v.info["warmup_s"] = time.perf_counter() - t0
            live.append(v)
        except Exception as e:  # one variant's failure (a kernel, out of memory) must not cost the others
            rec.data["errors"][v.name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        rec.save()
    for _ in range(args.repeats):
        for v in live:
            seconds, act = run_block(v, args.steps)
            rec.block(v, seconds, args.steps, act, peak)
            print(f"{v.name}: {v.tokens * args.steps / seconds:,.0f} tokens/s, activations {act:.2f} GiB", flush=True)


def build_trainer(overrides: list[str], tmp: Path) -> Trainer:
    dcfg = compose_config(overrides)
    cfg = to_object(dcfg)
    validate(cfg)
    return Trainer(cfg, tmp / str(len(list(tmp.iterdir()))), to_container(dcfg))


def set_compiled(model: torch.nn.Module, on: bool) -> None:
    """Compiled or eager blocks on one model (trainer.compile=true built them compiled)."""
    for block in model.blocks:
        if "_bench_compiled" not in block.__dict__:
            block.__dict__["_bench_compiled"] = block._compiled_call_impl
        block._compiled_call_impl = block.__dict__["_bench_compiled"] if on else None


def trainer_variant(name: str, t: Trainer, setup=lambda: None) -> Variant:
    tokens = t.loader.global_batch_size * t.cfg.data.seq_len
    return Variant(name, lambda: t.train_step(), tokens, t.n_params, setup)


def part_stream(size: list[str], compile_on: str, tmp: Path) -> tuple[list[Variant], list[tuple]]:
    base = build_trainer([*COMMON, "model=baseline_1b", compile_on, *size], tmp)
    mhc = build_trainer([*COMMON, "model=mhc_1b", compile_on, *size], tmp)

    def setup(t: Trainer, compiled: bool, kernel: str | None = None):
        return lambda: (set_compiled(t.model, compiled), kernel and set_kernel(t.model, kernel))

    variants = [trainer_variant("baseline/eager", base, setup(base, False)),
                trainer_variant("baseline/compiled", base, setup(base, True)),
                trainer_variant("mhc/eager", mhc, setup(mhc, False, "eager")),
                trainer_variant("mhc/fused", mhc, setup(mhc, False, "fused")),
                trainer_variant("mhc/triton", mhc, setup(mhc, False, "triton")),
                trainer_variant("mhc/compiled", mhc, setup(mhc, True, "fused")),
                trainer_variant("mhc/triton+compiled", mhc, setup(mhc, True, "triton"))]  # fmt: skip
    if "trainer.compile=false" in compile_on:  # the tiny dry run: no torch.compile (minutes of C++ on a CPU)
        variants = [v for v in variants if v.name in ("baseline/eager", "mhc/eager", "mhc/triton")]
    ratios = [("mhc_eager/baseline_eager", "mhc/eager", "baseline/eager"),
              ("mhc_fused/baseline_eager", "mhc/fused", "baseline/eager"),
              ("mhc_triton/baseline_eager", "mhc/triton", "baseline/eager"),
              ("mhc_compiled/baseline_compiled", "mhc/compiled", "baseline/compiled"),
              ("mhc_triton_compiled/baseline_compiled", "mhc/triton+compiled", "baseline/compiled"),
              ("baseline_compiled/baseline_eager", "baseline/compiled", "baseline/eager")]  # fmt: skip
    ratios += [(f"activation {n}", a, b, "activation_gib") for n, a, b in ratios[:5]]
    return variants, ratios


def part_loop(size: list[str], compile_on: str, tmp: Path) -> tuple[list[Variant], list[tuple]]:
    t = build_trainer([*COMMON, *LAYERS_16, "engine=zero0", compile_on, *size], tmp)
    plain = BareLoop(t.cfg, t)
    variants = [trainer_variant("framework", t), Variant("plain", plain.step, trainer_variant("", t).tokens,
                                                          t.n_params)]  # fmt: skip
    return variants, [("plain/framework (framework throughput / plain)", "plain", "framework")]


def part_fp8(size: list[str], compile_on: str, tmp: Path) -> tuple[list[Variant], list[tuple]]:
    recipes = ["rowwise", "tensorwise"] + (["blockwise"] if torch.cuda.is_available() else [])
    common = [*COMMON, *LAYERS_16, "engine=zero0", compile_on, *size]
    variants = [trainer_variant("bf16", build_trainer(common, tmp))]
    for recipe in recipes:
        over = ["precision=fp8", "precision.fp8.backend=torchao", f"precision.fp8.recipe={recipe}"]
        t = build_trainer([*common, *over], tmp)
        v = trainer_variant(f"fp8/{recipe}", t)
        v.info["fp8_coverage"] = t.parallel.fp8.coverage
        variants.append(v)
    return variants, [(f"bf16/fp8_{r} (fp8 speed-up)", "bf16", f"fp8/{r}") for r in recipes]


PARTS = {"stream": part_stream, "loop": part_loop, "fp8": part_fp8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny models on a CPU: the dry run of the test suite")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    args = p.parse_args()
    args.steps = args.steps or (1 if args.tiny else 4)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.warmup = args.warmup or (1 if args.tiny else 2)
    size = TINY if args.tiny else GPU
    compile_on = "trainer.compile=false" if args.tiny else "trainer.compile=true"  # a CPU compile takes minutes
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Record(args.out / f"{args.part}.json", args.part, args)
    device = torch.device("cuda" if not args.tiny else "cpu")
    peak = peak_flops(device, "bf16")[0] if device.type == "cuda" else peak_flops(device, "fp32")[0]
    rec.data["peak_tflops"], rec.data["gpu_table"] = peak / 1e12, GPU_PEAK_TFLOPS
    with tempfile.TemporaryDirectory(prefix="stabletrain-gpu-bench-") as tmp:
        variants, ratios = PARTS[args.part](size, compile_on, Path(tmp))
        rotate(variants, rec, args, peak)
        for r in ratios:
            rec.ratio(*r)
    print(json.dumps(rec.data["ratios"], indent=1))


if __name__ == "__main__":
    main()
