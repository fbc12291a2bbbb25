"""A model config back from its saved form (a run's config.yaml, an export's config.json): the registries say which
dataclass each polymorphic node (residual stream, feed-forward, router) is, so the typed config is rebuilt with
its enums and checks, without Hydra."""

from __future__ import annotations

from omegaconf import OmegaConf

from stabletrain.config import ModelConfig
from stabletrain.models.feedforward import FEED_FORWARDS
from stabletrain.models.moe import ROUTERS
from stabletrain.models.residual import RESIDUAL_STREAMS


def model_config_from_dict(saved: dict) -> ModelConfig:
    node = OmegaConf.structured(ModelConfig)
    node.residual = OmegaConf.structured(RESIDUAL_STREAMS[saved["residual"]["kind"]].config)
    ffn = OmegaConf.structured(FEED_FORWARDS[saved["ffn"]["kind"]].config)
    if "router" in saved["ffn"]:
        ffn.router = OmegaConf.structured(ROUTERS[saved["ffn"]["router"]["kind"]].config)
    node.ffn = ffn
    return OmegaConf.to_object(OmegaConf.merge(node, saved))
