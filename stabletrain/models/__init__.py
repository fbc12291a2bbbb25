"""Models: plain single-device PyTorch modules. Importing this package registers every block part: attention kinds,
residual streams, depth and signal scalings, feed-forwards and routers (their config dataclasses become options of
model/attention, model/residual, model/norm, model/signal, model/ffn, model/ffn/router)."""

from stabletrain.models import mla, moe  # noqa: F401  (register model/attention=mla, model/ffn=moe, the routers)
from stabletrain.models.feedforward import FEED_FORWARDS
from stabletrain.models.moe import ROUTERS
from stabletrain.models.parts import ATTENTIONS, DEPTH_SCALINGS, SIGNALS
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
    "ATTENTIONS",
    "DEPTH_SCALINGS",
    "SIGNALS",
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
