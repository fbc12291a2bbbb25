"""Run directories of the repro_* recipes, read back for the reproduction report: which recipe (logging.group) and
seed a run belongs to, its metrics and events, and losses of its final checkpoint on the training corpus's
validation split and on the held-out corpus (data/kjv), which no recipe trains on."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from stabletrain import REPO_ROOT
from stabletrain.analysis.report import read_jsonl, read_metrics
from stabletrain.analysis.repro_stats import block_output_variance, prune_increase
from stabletrain.config import DataConfig, PrecisionConfig
from stabletrain.data.build import build_data
from stabletrain.data.sources import LocalSourceConfig
from stabletrain.interop.run import TrainedRun, load_run
from stabletrain.parallel.fp8 import apply_fp8

HELDOUT = REPO_ROOT / "data" / "kjv" / "heldout.jsonl"
EVAL_BATCHES, EVAL_BATCH = 16, 8  # sequences of the run's data.seq_len + 1 tokens, the first of the split


@dataclass
class Run:
    dir: Path
    cfg: dict = field(repr=False)

    @property
    def group(self) -> str:
        return self.cfg["logging"].get("group") or ""

    @property
    def seed(self) -> int:
        return int(self.cfg["trainer"]["seed"])

    @cached_property
    def rows(self) -> list[dict]:
        return read_metrics(self.dir)

    @cached_property
    def events(self) -> list[dict]:
        return read_jsonl(self.dir / "events.jsonl")

    @property
    def vals(self) -> list[dict]:
        return [r for r in self.rows if "val_loss" in r]

    @property
    def final_val(self) -> float:
        return self.vals[-1]["val_loss"]

    @cached_property
    def trained(self) -> TrainedRun:
        return load_run(self.dir)

    @cached_property
    def model(self):
        """The final weights as the run's validation ran them, in eval mode: fp32, or bf16 weights and activations
        (precision.dtype), with the FP8 GEMMs of precision.fp8 (emulated on CPU)."""
        model = self.trained.model()
        precision = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrecisionConfig), self.cfg["precision"]))
        if precision.dtype == "bf16":
            model = model.to(torch.bfloat16)
        apply_fp8(model, precision)
        return model

    @cached_property
    def heldout_loss(self) -> float:
        """Mean next-token loss of the final weights (in the run's precision) on the held-out corpus, with the run's
        tokenizer."""
        return eval_loss(self.model, val_batches(heldout_config(self.trained)))

    @cached_property
    def depth(self) -> dict:
        """Per-block output variance and the loss increase when each block is removed, on the validation split."""
        model, batches = self.model, val_batches(run_data_config(self.trained), EVAL_BATCHES // 4)
        return {
            "variance": block_output_variance(model, batches[0][:, :-1]),
            "prune_increase": prune_increase(model.blocks, lambda: eval_loss(model, batches)),
        }


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (config.yaml next to metrics.jsonl) at or under the given paths, in path order."""
    found: dict[Path, Run] = {}
    for path in paths:
        candidates = [path] if (path / "config.yaml").is_file() else sorted(p.parent for p in path.rglob("config.yaml"))
        for d in candidates:
            if (d / "metrics.jsonl").is_file() and d.resolve() not in found:
                found[d.resolve()] = Run(d, yaml.safe_load((d / "config.yaml").read_text()))
    return list(found.values())


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return out


def run_data_config(trained: TrainedRun) -> DataConfig:
    """The run's data settings with its tokenizer pinned (an error if it is missing, never a new one)."""
    tokenizer = dataclasses.replace(trained.data_cfg.tokenizer, path=str(trained.tokenizer_path))
    return dataclasses.replace(trained.data_cfg, tokenizer=tokenizer)


def heldout_config(trained: TrainedRun) -> DataConfig:
    """The run's data settings on the held-out corpus, tokenized with the run's own tokenizer."""
    source = LocalSourceConfig(train_files=[str(HELDOUT)], val_files=[str(HELDOUT)])
    return dataclasses.replace(run_data_config(trained), name="kjv", sources={}, path=None, source=source)


def val_batches(cfg: DataConfig, n: int | None = None) -> list[torch.Tensor]:
    """The first n * 8 sequences of the validation split (n: EVAL_BATCHES), in batches of 8 (the same for every
    run of a corpus)."""
    n = EVAL_BATCHES if n is None else n
    val = build_data(cfg, 0, True).val
    count = min(n * EVAL_BATCH, len(val))
    return [val.get(np.arange(i, min(i + EVAL_BATCH, count))) for i in range(0, count, EVAL_BATCH)]


@torch.no_grad()
def eval_loss(model, batches: list[torch.Tensor]) -> float:
    losses = []
    for b in batches:
        logits = model(b[:, :-1])
        losses.append(float(F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())))
    return statistics.fmean(losses)
