"""Checks that run after composition and before anything heavy starts: every declared range (schema), the
cross-field rules a type system cannot express, paths that must exist, and the machine (a CUDA device when
asked for). Each failure is one ConfigError line naming the key; `validate` returns warnings to print."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from stabletrain.config.fields import ConfigError, check_ranges
from stabletrain.config.layout import check_layout, launched_world_size
from stabletrain.config.schema import (
    AttentionConfig,
    Config,
    DataConfig,
    FFNConfig,
    NormConfig,
    ResidualConfig,
    SignalConfig,
)
from stabletrain.config.source import SourceConfig, source_classes

CHECKPOINT_TAG = re.compile(r"^step_(\d+)$")


def validate(cfg: Config, world: int | None = None) -> list[str]:
    """Raise ConfigError on the first problem; return warnings (one line each) for the caller to print. `world`:
    the number of ranks (default: trainer.plan_world_size when planning, else the launcher's WORLD_SIZE)."""
    for group in ("model", "data", "engine", "precision", "optim", "logging", "trainer", "monitor"):
        check_ranges(getattr(cfg, group), group)
    _model(cfg)
    _engine(cfg)
    check_layout(cfg, world or launched_world_size(cfg))
    warnings = _training(cfg)
    validate_data(cfg.data)
    if cfg.data.doc_mask and not type(cfg.model.attention).doc_mask:
        raise ConfigError(f"data.doc_mask=true is not supported with model/attention={cfg.model.attention.kind}")
    if cfg.model.signal.kind == "bslo" or getattr(getattr(cfg.model.ffn, "router", None), "kind", "") == "bslo":
        warnings.append(
            "BSLO is experimental: our reading of one news article, not a published method (docs/methods.md)"
        )
    return warnings


def _component(node, key: str, base: type) -> None:
    """A component group's node must be one of the registered options (model/residual=<name>), not a string, and
    its `kind` names that option (setting `kind` by hand does not swap the component)."""
    group = key.replace(".", "/")
    if not isinstance(node, base):
        options = ", ".join(sorted(o.removesuffix(".yaml") for o in ConfigStore.instance().list(group)))
        raise ConfigError(f"{key}={node!r}: choose it with {group}=<name> (one of: {options})")
    selected = next(f.default for f in fields(type(node)) if f.name == "kind")
    if node.kind != selected:
        raise ConfigError(
            f"{key}.kind={node.kind} does not swap the component ({selected} is selected): use {group}={node.kind}"
        )
    for f in fields(node):
        value = getattr(node, f.name)
        if f.name != "kind" and hasattr(value, "kind") and is_dataclass(value):
            _component(value, f"{key}.{f.name}", type(value).__mro__[-2])


def _model(cfg: Config) -> None:
    m = cfg.model
    for key, base in (
        ("attention", AttentionConfig),
        ("residual", ResidualConfig),
        ("norm", NormConfig),
        ("ffn", FFNConfig),
        ("signal", SignalConfig),
    ):
        _component(getattr(m, key), f"model.{key}", base)
    for part in (m.attention, m.residual, m.norm, m.ffn, m.signal):
        part.check(m)


def _fp8(cfg: Config) -> None:
    f = cfg.precision.fp8
    if f.dispatch and not (f.enabled and cfg.engine.expert_parallel > 1):
        raise ConfigError("precision.fp8.dispatch=true needs precision=fp8 and engine.expert_parallel > 1")
    if not f.enabled or f.backend != "torchao":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("precision.fp8.backend=torchao needs torchao: pip install -e '.[fp8]'")
    sm90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    if f.recipe == "blockwise" and not (sm90 and cfg.trainer.device != "cpu"):
        raise ConfigError(
            "precision.fp8.recipe=blockwise with backend=torchao needs an SM90+ GPU (torchao's blockwise kernels); "
            "use precision.fp8.backend=scaled_mm or emulate, or recipe=rowwise|tensorwise"
        )


def _engine(cfg: Config) -> None:
    e = cfg.engine
    if e.offload_param != "none" and e.zero_stage != 3:
        raise ConfigError("engine.offload_param needs engine.zero_stage=3")
    if e.offload_optimizer != "none" and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")
    ep = e.expert_parallel
    if ep > 1:
        if cfg.model.ffn.kind != "moe":
            raise ConfigError(f"engine.expert_parallel={ep} needs MoE layers (model/ffn=moe)")
        if cfg.model.ffn.n_routed % ep:
            raise ConfigError(
                f"model.ffn.n_routed={cfg.model.ffn.n_routed} is not divisible by engine.expert_parallel={ep}"
            )
        if e.zero_stage == 3:
            raise ConfigError(
                f"engine.expert_parallel={ep} runs with engine.zero_stage 0-2 (ZeRO-3 would gather every expert on "
                "every rank, which is what expert parallelism avoids)"
            )
    _fp8(cfg)
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise ConfigError(f"trainer.device=cuda, but this machine has {build} (use trainer.device=cpu or auto)")


def _training(cfg: Config) -> list[str]:
    t, o, mon = cfg.trainer, cfg.optim, cfg.monitor
    warnings = []
    if t.stop_at is not None and t.stop_at > t.max_steps:
        raise ConfigError(f"trainer.stop_at={t.stop_at} must lie in 1..trainer.max_steps={t.max_steps}")
    if str(t.compile).lower() not in ("true", "false", "auto"):
        raise ConfigError(f"trainer.compile={t.compile} must be true, false or auto")
    if o.grad_clip_warmup_steps and not o.grad_clip:
        raise ConfigError("optim.grad_clip_warmup_steps needs optim.grad_clip > 0")
    if o.schedule == "step" and len(o.step_milestones) != len(o.step_factors):
        raise ConfigError("optim.step_milestones and optim.step_factors must have the same length")
    if any(b <= a for a, b in zip(o.step_milestones, o.step_milestones[1:])):
        raise ConfigError(f"optim.step_milestones={o.step_milestones} must be strictly increasing")
    if o.total_steps is not None and o.total_steps < t.max_steps:
        warnings.append(
            f"optim.total_steps={o.total_steps} is below trainer.max_steps={t.max_steps}: the LR "
            f"schedule ends at step {o.total_steps} and stays at its final value after it"
        )
    for r in t.skip_batches:
        if len(r) != 2 or not 0 <= r[0] < r[1]:
            raise ConfigError(f"trainer.skip_batches entry {list(r)} must be [start, end) with 0 <= start < end")
    late = [s for s in [mon.inject.step, *mon.inject.steps] if s is not None and s > t.max_steps]
    if late:
        warnings.append(f"monitor.inject steps {late} are after trainer.max_steps={t.max_steps}: not injected")
    check_resume_path(t.resume)
    return warnings


def check_resume_path(resume: str) -> None:
    """trainer.resume names a checkpoint (step_* directory) or a directory holding some: it must exist."""
    if resume in ("none", "auto"):
        return
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"trainer.resume={resume}: no such directory (none | auto | a checkpoint directory)")
    if not path.is_dir():
        raise ConfigError(
            f"trainer.resume={resume} is a file; give a checkpoint directory (step_*) or a directory of them"
        )
    if not CHECKPOINT_TAG.match(path.name) and not any(CHECKPOINT_TAG.match(p.name) for p in path.iterdir()):
        raise ConfigError(f"trainer.resume={resume} holds no checkpoint (no step_* directory)")


def validate_data(d: DataConfig) -> None:
    """Data checks that need no tokenizer or network: values, files and globs, the prepared directory."""
    check_ranges(d, "data")
    if d.format == "pretokenized":
        if not d.path:
            raise ConfigError(
                "data.format=pretokenized needs data.path=<directory written by python -m stabletrain.cli.prepare>"
            )
        if not (Path(d.path) / "manifest.json").is_file():
            raise ConfigError(
                f"data.path={d.path} holds no manifest.json (write it with: python -m "
                f"stabletrain.cli.prepare data={d.name} out={d.path})"
            )
    if d.tokenizer.path and not Path(d.tokenizer.path).exists():
        parent = Path(d.tokenizer.path).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(
                f"data.tokenizer.path={d.tokenizer.path}: {parent} is a file, so no tokenizer can be written below it"
            )
    if not d.sources:
        if type(d.source) is SourceConfig:  # the base: a preset that selects none (data=mixture), no data.sources
            options = ", ".join(sorted(source_classes()))
            raise ConfigError(f"data.source: none selected: choose one with data/source=<name> (one of: {options})")
        _component(d.source, "data.source", SourceConfig)
    for name, src in d.source_configs().items():
        key = f"data.sources.{name}" if d.sources else "data.source"
        check_ranges(src, key)
        if d.format == "text":  # a prepared directory's sources are checked against its manifest at load
            src.check(d, key)
