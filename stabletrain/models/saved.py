"""A model config back from its saved form (a run's config.yaml, an export's config.json): the registries say which
dataclass each polymorphic node (attention, residual stream, depth and signal scaling, feed-forward, router) is, so
the typed config is rebuilt with its enums and checks, without Hydra. Configs saved before the block's parts were
components (`attention: mla` with a separate `mla:` node, `n_kv_heads`, `qk_norm`, `norm.depth_scaling`,
`signal_scaling` with `bslo:`) are read in their new form."""

from __future__ import annotations

import copy

from omegaconf import OmegaConf

from stabletrain.config import ModelConfig
from stabletrain.models.feedforward import FEED_FORWARDS
from stabletrain.models.moe import ROUTERS
from stabletrain.models.parts import ATTENTIONS, DEPTH_SCALINGS, SIGNALS
from stabletrain.models.residual import RESIDUAL_STREAMS


def _upgrade(saved: dict) -> dict:
    """The pre-components layout of the block's parts, in the current one."""
    saved = copy.deepcopy(saved)
    if not isinstance(saved.get("attention", {}), dict):
        kind = str(saved.pop("attention"))
        extra = saved.pop("mla", {}) if kind == "mla" else {}
        saved.pop("mla", None)
        if kind == "gqa":
            extra["n_kv_heads"] = saved.get("n_kv_heads")
        saved["attention"] = {"kind": kind, "qk_norm": saved.pop("qk_norm", False), **extra}
    saved.pop("n_kv_heads", None)
    norm = saved.get("norm") or {}
    if "depth_scaling" in norm:
        saved["norm"] = {"kind": str(norm["depth_scaling"])}
    if "signal_scaling" in saved:
        kind = str(saved.pop("signal_scaling"))
        bslo = saved.pop("bslo", {})
        saved["signal"] = {"kind": kind, **(bslo if kind == "bslo" else {})}
    return saved


def model_config_from_dict(saved: dict) -> ModelConfig:
    saved = _upgrade(saved)
    node = OmegaConf.structured(ModelConfig)
    for key, registry in (
        ("attention", ATTENTIONS),
        ("residual", RESIDUAL_STREAMS),
        ("norm", DEPTH_SCALINGS),
        ("signal", SIGNALS),
    ):
        if key in saved:
            node[key] = OmegaConf.structured(registry[saved[key]["kind"]].config)
    ffn = OmegaConf.structured(FEED_FORWARDS[saved["ffn"]["kind"]].config)
    if "router" in saved["ffn"]:
        ffn.router = OmegaConf.structured(ROUTERS[saved["ffn"]["router"]["kind"]].config)
    node.ffn = ffn
    return OmegaConf.to_object(OmegaConf.merge(node, saved))
