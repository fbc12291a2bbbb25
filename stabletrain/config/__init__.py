"""The config tree: schemas (schema.py), field ranges and vocabularies (fields.py), checks (validate.py) and
composition helpers (compose.py)."""

from stabletrain.config.compose import check_overrides, one_line, register, to_container, to_object
from stabletrain.config.fields import ConfigError, check_ranges
from stabletrain.config.layout import (
    RankLayout,
    check_layout,
    checkpoint_segment,
    data_parallel_size,
    global_batch_size,
    grad_accum_steps,
    launched_world_size,
)
from stabletrain.config.monitor import DetectorConfig, InjectConfig, MonitorConfig
from stabletrain.config.schema import (
    AttentionConfig,
    Config,
    DataConfig,
    EngineConfig,
    FFNConfig,
    LoggingConfig,
    ModelConfig,
    NormConfig,
    OptimConfig,
    PrecisionConfig,
    PrepareConfig,
    ResidualConfig,
    SignalConfig,
    SourceConfig,
    TokenizerConfig,
    TrainerConfig,
)
from stabletrain.config.validate import check_resume_path, validate, validate_data

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DetectorConfig",
    "EngineConfig",
    "FFNConfig",
    "InjectConfig",
    "LoggingConfig",
    "ModelConfig",
    "MonitorConfig",
    "NormConfig",
    "OptimConfig",
    "PrecisionConfig",
    "PrepareConfig",
    "RankLayout",
    "ResidualConfig",
    "SignalConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "check_layout",
    "check_overrides",
    "checkpoint_segment",
    "data_parallel_size",
    "global_batch_size",
    "grad_accum_steps",
    "launched_world_size",
    "check_ranges",
    "check_resume_path",
    "one_line",
    "register",
    "to_container",
    "to_object",
    "validate",
    "validate_data",
]
