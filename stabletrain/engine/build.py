"""The engine a config asks for: data parallel (DeepSpeed ZeRO 0-3) or pipeline stages x data parallel."""

from __future__ import annotations

import torch

from stabletrain.config import Config, RankLayout
from stabletrain.engine.base import Engine
from stabletrain.engine.deepspeed_engine import DeepSpeedEngine
from stabletrain.engine.pipeline import PipelineEngine


def build_engine(cfg: Config, model: torch.nn.Module, layout: RankLayout) -> Engine:
    engine_class = PipelineEngine if cfg.engine.pipeline_stages > 1 else DeepSpeedEngine
    return engine_class(cfg, model, layout)
