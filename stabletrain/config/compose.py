"""Composition helpers: the schema in Hydra's ConfigStore, one-line composition errors, typed copies."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stabletrain import REPO_ROOT
from stabletrain.config.schema import Config, DataConfig
from stabletrain.config.source import moved_source_key


def _repo_path(rel: str) -> str:
    return str(REPO_ROOT / rel)


def register() -> None:
    """Register the schema and the `${repo:...}` resolver (absolute paths inside the repository). The component
    groups (model/attention, model/residual, model/norm, model/ffn, model/signal, ...) are filled by the components'
    registries when their packages are imported (stabletrain.models)."""
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", _repo_path)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)


def to_object(cfg: DictConfig) -> Config:
    """Resolved, typed copy of a composed config."""
    return OmegaConf.to_object(cfg)


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict (enums as their strings): what config.yaml and W&B store."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep what names the problem, drop search paths and hints."""
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith(
                ("Config search path", "provider=", "Set the environment", "reference_type", "object_type", "To append")
            ):
                if line.startswith("Config search path"):
                    break
                continue
            if line and line not in parts:
                parts.append(line)
    return "; ".join(parts).replace(":; ", ": ").replace(".; ", "; ")


def check_overrides(argv: list[str], config_dir: Path, config_name: str = "config") -> str | None:
    """Compose once with the command-line overrides; return a one-line error, or None when they compose.

    Hydra reports the same errors over several lines; this runs first so a typo costs the user one line.
    Sweeps (-m) are left to Hydra, which composes each job itself.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except Exception as e:  # any composition failure is the user's input, reported as such
        return moved_source_key(overrides, {f.name for f in fields(DataConfig)}) or one_line(e)
    return None
