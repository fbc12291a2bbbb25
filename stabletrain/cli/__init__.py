"""Command-line entry points; each parses its arguments and calls the library.

    python train.py ...                    (stabletrain.cli.train) compose the config, train
    python -m stabletrain.cli.prepare ...  pre-tokenize a source into shards
    python -m stabletrain.cli.tokenizer ...  train a sentencepiece tokenizer

`setup()` imports every component package (their registries fill the config groups: model/residual,
model/ffn, model/ffn/router, data/source, the callbacks), the modules named in STABLETRAIN_PLUGINS (comma-separated:
your own residual streams, routers, data sources or callbacks, registered the same way), and registers the schema.
"""

from __future__ import annotations

import importlib
import os

from hydra import compose, initialize_config_dir

import stabletrain.data.sources  # noqa: F401  (registers the data sources: data/source)
import stabletrain.engine.pipeline  # noqa: F401  (registers the pipeline's layout rules)
import stabletrain.models  # noqa: F401  (registers the block's parts)
import stabletrain.monitoring  # noqa: F401  (registers the monitoring callbacks)
from stabletrain import REPO_ROOT
from stabletrain.config import Config, ConfigError, check_overrides, register, to_object

PLUGINS_ENV = "STABLETRAIN_PLUGINS"
CONFIG_DIR = REPO_ROOT / "conf"


def setup() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)
    register()


def compose_config(overrides: list[str]) -> Config:
    """The typed config tree composed with command-line overrides (for the CLIs that do not train)."""
    setup()
    error = check_overrides(overrides, CONFIG_DIR)
    if error:
        raise ConfigError(error)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_object(compose("config", overrides=overrides))
