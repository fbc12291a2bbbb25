"""`parallelize`: everything that adapts the plain model to the hardware, applied from outside it, on the meta
device (before any weight exists), in this fixed order:

    1. FP8              the blocks' Linears become FP8 Linears (precision.fp8)              parallel/fp8.py
    2. recomputation    run_blocks runs segments under activation checkpointing             parallel/recompute.py
                        (engine.activation_checkpointing)
    3. experts          this rank's routed experts are taken out of the model and the      parallel/expert_parallel.py
                        all-to-all dispatch goes in (engine.expert_parallel)
    4. compile          each block is torch.compile'd (trainer.compile)                     parallel/compile.py

FP8 comes first so that the experts taken out and the compiled graphs are the FP8 ones; compilation comes last
because it traces lazily, at the first step, whatever the earlier steps made of the blocks. The engine adapter then
wraps the materialized result for ZeRO or the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stabletrain import StableTrainError
from stabletrain.config import Config, RankLayout
from stabletrain.parallel.compile import compile_blocks, compile_enabled
from stabletrain.parallel.expert_parallel import ExpertParallel
from stabletrain.parallel.fp8 import FP8Conversion, apply_fp8
from stabletrain.parallel.recompute import apply_activation_checkpointing


@dataclass
class Parallelized:
    model: nn.Module
    experts: ExpertParallel | None = None  # this rank's routed experts, outside the module tree
    fp8: FP8Conversion = field(default_factory=FP8Conversion)  # what runs in FP8 (fp8/coverage)
    compiled: bool = False

    def describe(self, cfg: Config, blocks: range) -> str:
        parts = [f"blocks {blocks.start}-{blocks.stop - 1} on this rank"]
        f = cfg.precision.fp8
        if f.enabled:
            padded = f", {len(self.fp8.padded)} padded to the backend's tile" if self.fp8.padded else ""
            parts.append(
                f"fp8 ({f.backend}, {f.recipe}) on {len(self.fp8.converted)} block Linear(s){padded}, "
                f"coverage {self.fp8.coverage:.0%}"
            )
        if cfg.engine.activation_checkpointing != "none":
            parts.append(f"recomputation {cfg.engine.activation_checkpointing}")
        if self.experts is not None:
            parts.append(f"expert parallel {cfg.engine.expert_parallel}")
        parts.append("compiled blocks" if self.compiled else "eager")
        return "; ".join(parts)

    def extra_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules that belong to the model but are not in its module tree, under their names in it."""
        return self.experts.named_local_experts() if self.experts is not None else []


def parallelize(model: nn.Module, cfg: Config, layout: RankLayout, blocks: range, device: torch.device) -> Parallelized:
    """Apply FP8, recomputation, expert parallelism and compilation, in that order, to the blocks `blocks` this
    rank runs (all of them without pipeline stages)."""
    out = Parallelized(model)
    out.fp8 = apply_fp8(model, cfg.precision)
    if out.fp8.coverage < cfg.precision.fp8.min_coverage:
        raise StableTrainError(
            f"precision.fp8: {out.fp8.coverage:.1%} of the block Linears' weights run in FP8, below "
            f"precision.fp8.min_coverage={cfg.precision.fp8.min_coverage:g} ({len(out.fp8.fallbacks)} stay in "
            f"{cfg.precision.dtype}: {', '.join(out.fp8.fallbacks)})"
        )
    apply_activation_checkpointing(model, cfg)
    if cfg.engine.expert_parallel > 1:
        out.experts = ExpertParallel(model, cfg.engine.expert_parallel, layout, blocks, cfg.precision.fp8.dispatch)
    if compile_enabled(cfg.trainer.compile, device):
        compile_blocks(model)
        out.compiled = True
    return out
