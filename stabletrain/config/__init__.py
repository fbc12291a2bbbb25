"""The config tree: schemas (schema.py), field ranges and vocabularies (fields.py), checks (validate.py) and
composition helpers (compose.py)."""

from stabletrain.config.compose import check_overrides, one_line, register, to_container, to_object
from stabletrain.config.fields import ConfigError, check_ranges
from stabletrain.config.schema import (
    BSLOConfig,
    Config,
    DataConfig,
    DetectorConfig,
    EngineConfig,
    FFNConfig,
    InjectConfig,
    LoggingConfig,
    MLAConfig,
    ModelConfig,
    MonitorConfig,
    NormConfig,
    OptimConfig,
    PrecisionConfig,
    PrepareConfig,
    ResidualConfig,
    SourceConfig,
    TokenizerConfig,
    TrainerConfig,
)
from stabletrain.config.validate import check_resume_path, validate, validate_data

__all__ = [
    "BSLOConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DetectorConfig",
    "EngineConfig",
    "FFNConfig",
    "InjectConfig",
    "LoggingConfig",
    "MLAConfig",
    "ModelConfig",
    "MonitorConfig",
    "NormConfig",
    "OptimConfig",
    "PrecisionConfig",
    "PrepareConfig",
    "ResidualConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "check_overrides",
    "check_ranges",
    "check_resume_path",
    "one_line",
    "register",
    "to_container",
    "to_object",
    "validate",
    "validate_data",
]
