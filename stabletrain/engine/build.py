"""The engine a config asks for: data parallel (DeepSpeed ZeRO 0-3) or pipeline stages x data parallel."""

from __future__ import annotations

from stabletrain.config import Config
from stabletrain.engine.deepspeed_engine import DeepSpeedEngine
from stabletrain.engine.pipeline import PipelineEngine


def engine_class(cfg: Config) -> type[DeepSpeedEngine]:
    return PipelineEngine if cfg.engine.pipeline_stages > 1 else DeepSpeedEngine
