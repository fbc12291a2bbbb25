"""Values derived from the configuration, computed once per run (the configuration itself is read-only after
validation) and saved beside config.yaml as resolved.yaml, which resume, export and evaluation read back.

    world_size, data_parallel, pipeline_stages    the ranks and how they divide
    grad_accum_steps, global_batch_size            micro-batches per step and sequences per step
    vocab_size                                     model.vocab_size, or the tokenizer's when that is unset
    layout                                         ZeRO stage, expert parallelism, recomputation, micro-batch
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from stabletrain.config.fields import ConfigError
from stabletrain.config.layout import checkpoint_segment, data_parallel_size, global_batch_size, grad_accum_steps
from stabletrain.config.schema import Config, ModelConfig

FILE = "resolved.yaml"


@dataclass(frozen=True)
class Resolved:
    world_size: int
    data_parallel: int
    pipeline_stages: int
    grad_accum_steps: int
    global_batch_size: int
    vocab_size: int
    layout: dict = field(default_factory=dict)

    def model(self, cfg: Config) -> ModelConfig:
        """The model's config with its vocabulary resolved (a copy: the run's config stays as composed)."""
        return dataclasses.replace(cfg.model, vocab_size=self.vocab_size)

    def save(self, run_dir: Path) -> None:
        (run_dir / FILE).write_text(OmegaConf.to_yaml(asdict(self)))


def resolve(cfg: Config, world: int, tokenizer_vocab: int) -> Resolved:
    """The derived values of a run on `world` ranks whose tokenizer has `tokenizer_vocab` ids."""
    e, vocab = cfg.engine, cfg.model.vocab_size
    if vocab is not None and vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    layout = {
        "zero_stage": e.zero_stage,
        "expert_parallel": e.expert_parallel,
        "activation_checkpointing": str(e.activation_checkpointing),
        "checkpoint_segment": checkpoint_segment(cfg),
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "precision": str(cfg.precision.dtype),
    }
    return Resolved(
        world,
        data_parallel_size(cfg, world),
        e.pipeline_stages,
        grad_accum_steps(cfg, world),
        global_batch_size(cfg, world),
        vocab or tokenizer_vocab,
        layout,
    )


def load_resolved(run_dir: Path) -> Resolved | None:
    """A run directory's resolved.yaml, or None (runs of earlier versions have none)."""
    path = Path(run_dir) / FILE
    return Resolved(**OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else None
