"""Models: plain single-device PyTorch modules. Importing this package registers every residual stream,
feed-forward and router (their config dataclasses become options of model/residual, model/ffn, model/ffn/router)."""

from stabletrain.models import moe  # noqa: F401  (registers model/ffn=moe and the routers)
from stabletrain.models.feedforward import FEED_FORWARDS
from stabletrain.models.moe import ROUTERS
from stabletrain.models.residual import RESIDUAL_STREAMS
from stabletrain.models.saved import model_config_from_dict
from stabletrain.models.transformer import (
    Transformer,
    count_params,
    flops_per_token,
    meta_model,
    model_flops_per_token,
    param_count,
)

__all__ = [
    "FEED_FORWARDS",
    "RESIDUAL_STREAMS",
    "ROUTERS",
    "Transformer",
    "build_model",
    "count_params",
    "model_flops_per_token",
    "flops_per_token",
    "meta_model",
    "model_config_from_dict",
    "param_count",
]


def build_model(cfg) -> Transformer:
    return Transformer(cfg)
