"""Feed-forward layers of a block, by registered name (model/ffn=<name>): `dense` (SwiGLU) here, `moe` in
stabletrain.models.moe. Each entry's object builds the block's feed-forward: fn(d_model, cfg, layer_index)."""

from __future__ import annotations

from torch import nn

from stabletrain.config import FFNConfig
from stabletrain.models.layers import SwiGLU
from stabletrain.registry import Registry

FEED_FORWARDS = Registry("feed-forward", group="model/ffn")


@FEED_FORWARDS.register("dense", config=FFNConfig)
def dense(d_model: int, cfg: FFNConfig, layer_index: int) -> nn.Module:
    return SwiGLU(d_model, cfg.dense_width(d_model))


def build_ffn(d_model: int, cfg: FFNConfig, layer_index: int) -> nn.Module:
    return FEED_FORWARDS[cfg.kind].obj(d_model, cfg, layer_index)
