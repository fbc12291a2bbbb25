"""The registered parts a block is assembled from, each chosen by its own config group and carrying its own config
dataclass with its checks (Megatron-Core's layer specs are the model):

    model/attention   ATTENTIONS        mha (stabletrain.models.layers), gqa (same), mla (stabletrain.models.mla)
    model/norm        DEPTH_SCALINGS    none, lns: a factor on block l's pre-norm outputs
    model/signal      SIGNALS           none, bslo (stabletrain.models.residual.base): a scalar on sublayer outputs
    model/residual    RESIDUAL_STREAMS  (stabletrain.models.residual)
    model/ffn         FEED_FORWARDS     (stabletrain.models.feedforward, stabletrain.models.moe)

An attention kind registers `fn(model_cfg, layer_index) -> module` whose forward is (x, cos, sin[, attn_mask]); a
signal scaling registers `fn(signal_cfg) -> module` (or None). A new part is one module and one YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stabletrain.config import NormConfig, SignalConfig
from stabletrain.config.choices import ResidualInit
from stabletrain.registry import Registry

ATTENTIONS = Registry("attention", group="model/attention")
DEPTH_SCALINGS = Registry("depth scaling", group="model/norm")
SIGNALS = Registry("signal scaling", group="model/signal")


@dataclass
class LNSConfig(NormConfig):
    """LayerNorm Scaling (arXiv 2502.05795): block l's (1-indexed) pre-norm outputs times 1/sqrt(l)."""

    kind: str = "lns"

    def scale(self, layer_index: int) -> float | None:
        return 1.0 / math.sqrt(layer_index + 1)

    def out_proj_init(self) -> ResidualInit:
        return ResidualInit.plain  # its paper found the depth-scaled init worse with it


DEPTH_SCALINGS.register("none", config=NormConfig)(NormConfig)
DEPTH_SCALINGS.register("lns", config=LNSConfig)(LNSConfig)
SIGNALS.register("none", config=SignalConfig)(lambda cfg: None)
