"""The reproduction report: each paper claim -> the paper's number -> ours -> reproduced / not reproduced /
inconclusive, with seeds and spread, tables and plots, from the run directories of the repro_* recipes.

    python -m stabletrain.analysis.reproduce multirun/repro --out docs/reproduction.md

Claims measured so far (`make reproduce`):
- Curse of Depth / LayerNorm Scaling (Sun et al.): (a) the per-layer output variance grows with depth under
  pre-norm and LNS flattens it; (b) removing a deep block costs more validation loss with LNS than without (its
  deep layers do more work); (c) LNS reaches a lower validation loss at equal tokens. Runs:
  multirun/repro/lns/{none,lns}_s{seed}.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stabletrain.analysis.report import read_metrics
from stabletrain.data.setup import build_data
from stabletrain.interop.run import TrainedRun, load_run


class _Stream:
    """A probe (Transformer.probe) that keeps the variance of the stream entering each block and leaving the last."""

    def __init__(self):
        self.var: dict[int, float] = {}

    def observe(self, index: int, x: torch.Tensor) -> None:
        self.var[index] = float(x.float().var())


def _val_batches(run: TrainedRun, n: int) -> list[torch.Tensor]:
    data = build_data(run.data_cfg, 0, True)
    ids = np.arange(min(n * 8, len(data.val)))
    return [data.val.get(ids[i : i + 8]) for i in range(0, len(ids), 8)]


@torch.no_grad()
def _loss(model, batches) -> float:
    return statistics.fmean(float(F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())) for b in batches)


@torch.no_grad()
def depth_profile(run: TrainedRun, n_batches: int = 4) -> dict:
    """Per-block output variance, and the validation-loss increase when each block is removed."""
    model, batches = run.model(), _val_batches(run, n_batches)
    probe = model.probe = _Stream()
    model(batches[0][:, :-1])
    model.probe = None
    variance = [probe.var[i + 1] for i in range(len(model.blocks))]
    base = _loss(model, batches)
    increase = []
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, *args: x  # the block removed: its input passes through
        increase.append(_loss(model, batches) - base)
        block.forward = forward
    return {"variance": variance, "prune_increase": increase, "val_loss": base}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def lns_claims(root: Path) -> tuple[list[list[str]], dict]:
    runs = {kind: sorted(root.glob(f"{kind}_s*")) for kind in ("none", "lns")}
    if not all(runs.values()):
        return [], {}
    prof = {k: [depth_profile(load_run(d)) for d in ds] for k, ds in runs.items()}
    final = {k: [read_metrics(d)[-1]["val_loss"] for d in ds] for k, ds in runs.items()}
    L = len(prof["none"][0]["variance"])
    growth = {k: [p["variance"][-1] / p["variance"][0] for p in ps] for k, ps in prof.items()}

    def deep_over_shallow(inc: list[float]) -> float:
        return statistics.fmean(inc[L // 2 :]) / max(statistics.fmean(inc[: L // 2]), 1e-9)

    deep = {k: [deep_over_shallow(p["prune_increase"]) for p in ps] for k, ps in prof.items()}
    rows = []
    (g0, s0), (g1, s1) = _mean_sd(growth["none"]), _mean_sd(growth["lns"])
    verdict = "reproduced" if g1 + s1 < g0 - s0 else ("not reproduced" if g1 > g0 else "inconclusive")
    rows.append(["3a. Pre-norm output variance grows with depth; LNS flattens it", "variance grows ~linearly "
                 "with depth in pre-norm (Fig. 2); LNS bounds it", f"last/first block variance: pre-norm "
                 f"{g0:.1f} ± {s0:.1f}, LNS {g1:.1f} ± {s1:.1f}", verdict])  # fmt: skip
    (d0, e0), (d1, e1) = _mean_sd(deep["none"]), _mean_sd(deep["lns"])
    verdict = "reproduced" if d1 - e1 > d0 + e0 else ("not reproduced" if d1 < d0 else "inconclusive")
    rows.append(["3b. Deep blocks matter more with LNS (layer pruning)", "pruning a deep layer hurts LNS models "
                 "more than pre-norm ones (Fig. 4)", f"loss increase deep/shallow half: pre-norm {d0:.2f} ± {e0:.2f}"
                 f", LNS {d1:.2f} ± {e1:.2f}", verdict])  # fmt: skip
    (v0, w0), (v1, w1) = _mean_sd(final["none"]), _mean_sd(final["lns"])
    verdict = "reproduced" if v1 + w1 < v0 - w0 else ("not reproduced" if v1 > v0 + w0 else "inconclusive")
    rows.append(["3c. LNS lowers validation loss at equal tokens", "130M: perplexity 26.73 -> 25.76 (-3.6%)",
                 f"val loss pre-norm {v0:.4f} ± {w0:.4f} (ppl {math.exp(v0):.1f}), LNS {v1:.4f} ± {w1:.4f} (ppl "
                 f"{math.exp(v1):.1f}); {len(final['none'])} seeds", verdict])  # fmt: skip
    return rows, {"prof": prof, "final": final}


def plot_lns(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, label in (("none", "pre-norm"), ("lns", "LNS")):
        var = np.array([p["variance"] for p in data["prof"][kind]])
        inc = np.array([p["prune_increase"] for p in data["prof"][kind]])
        x = np.arange(1, var.shape[1] + 1)
        a.errorbar(x, var.mean(0), yerr=var.std(0), marker="o", label=label, capsize=3)
        b.errorbar(x, inc.mean(0), yerr=inc.std(0), marker="o", label=label, capsize=3)
    a.set(title="output variance after each block", xlabel="block", yscale="log")
    b.set(title="validation-loss increase when the block is removed", xlabel="block")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


NOT_YET = [
    ["1. mHC keeps the composite gain near 1 where HC's grows (depth 12/24/48 × 3 seeds)", "27B: ~3000 (HC) vs ~1.6 "
     "(mHC)", "one seed at depth 24 in docs/residual-streams.md; the sweep is not run yet", "not run"],
    ["2. Loss at equal tokens: mHC < HC, baseline", "3B/9B/27B: mHC lowest", "not run yet", "not run"],
    ["4. Aux-loss-free balancing: lower global MaxVio at equal or better loss", "1B: MaxVio 0.04 vs 0.72",
     "one seed in docs/moe.md; 3 seeds and the u sweep not run yet", "not run"],
    ["5. FP8 vs bf16 loss gap < 0.25%", "DeepSeek-V3, 16B/230B", "one seed per size in docs/fp8.md: -0.95% (d256), "
     "-0.68% (d512), fp8 lower; inconclusive at one seed", "inconclusive"],
    ["6. BSLO (our reading of an article, not a paper's claim)", "—", "not run yet", "not run"],
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the repro sweep root (multirun/repro)")
    p.add_argument("--out", type=Path, required=True, help="the markdown report to write")
    args = p.parse_args(argv)
    rows, lns = lns_claims(args.root / "lns")
    if not rows:
        raise SystemExit(f"stabletrain: error: no runs under {args.root / 'lns'} (run make reproduce)")
    figures = args.out.parent / "reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    plot_lns(lns, figures / "lns_depth.png")
    head = ["claim", "paper", "ours", "verdict"]
    table = ["| " + " | ".join(head) + " |", "|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in [*rows, *NOT_YET]]
    args.out.write_text(
        "# Reproduction\n\nGenerated by `python -m stabletrain.analysis.reproduce` from the runs of `make reproduce` "
        "(CPU, tiny models: a claim that does not show at this scale is reported as such).\n\n"
        + "\n".join(table)
        + f"\n\n![LNS depth profile](reproduction/lns_depth.png)\n\n{RECIPE}"
    )
    print("\n".join(table))
    print(f"wrote {args.out}")


RECIPE = """## The runs

Claim 3: `conf/experiment/repro_lns.yaml` (12 blocks, d 64, 300 steps, sequence 64, batch 8), pre-norm and LNS,
seeds 0, 1, 2. Per-layer variance: the stream after each block on one validation batch of the trained model.
Pruning: the validation loss over 4 batches of 8 with each block replaced by the identity, minus the full model's.
Spread: ± one standard deviation over seeds; a verdict is `reproduced` only when the difference exceeds the spreads.

Reading 3b at this scale: after 300 steps the first two blocks carry almost all of the loss a block removal costs,
in both models, and the deep blocks of either model have learned little yet; the paper measures trained
billion-parameter models, where the deep layers of a pre-norm model are the ones found redundant. A tiny, briefly
trained model cannot show that contrast, so a `not reproduced` here says more about the scale than the method.
Claims 1, 2, 4 and 6 have recipes to come (their single-seed experiments are in docs/residual-streams.md and
docs/moe.md).
"""


if __name__ == "__main__":
    main()
