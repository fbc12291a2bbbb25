"""A trained run, read back: its typed config, the consolidated fp32 weights of one intact checkpoint, and its
tokenizer. Works on any layout the engine writes (stabletrain.checkpoint.model_weights). Checkpoints are verified as
training verifies them (digests, the safe-loading scan; a manifest without digests only when legacy ones are
accepted), and a newer checkpoint that is skipped is said on stderr, with the reason."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file

from stabletrain import StableTrainError, checkpoint
from stabletrain.config import DataConfig, ModelConfig
from stabletrain.config.resolved import load_resolved
from stabletrain.data.build import data_config_from_dict, tokenizer_path
from stabletrain.models import Transformer, build_model, model_config_from_dict


@dataclass
class TrainedRun:
    run_dir: Path
    tag_dir: Path
    step: int
    model_cfg: ModelConfig
    data_cfg: DataConfig
    saved: dict  # the run's config.yaml as a plain dict
    weights: dict[str, torch.Tensor]

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer the run trained with. Never trained anew here: a tokenizer trained again on the same text
        need not assign the same ids, and the weights would be read with the wrong vocabulary."""
        path = tokenizer_path(self.data_cfg)
        if not path.exists():
            raise StableTrainError(
                f"{self.run_dir}: its tokenizer {path} is missing (a run made in another checkout? set "
                f"data.tokenizer.path to the run's tokenizer, or analyse it where it was trained)"
            )
        return path

    def model(self) -> Transformer:
        """The unsharded model in fp32 with the checkpoint's weights, in eval mode."""
        torch.manual_seed(0)
        model = build_model(self.model_cfg)
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        if missing or unexpected:
            raise StableTrainError(
                f"{self.tag_dir}: the weights do not fit the run's model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        return model.eval()


def data_config(saved: dict) -> DataConfig:
    return data_config_from_dict(saved)


def warn(message: str) -> None:
    print(f"stabletrain: warning: {message}", file=sys.stderr)


def find_checkpoint(
    run_dir: Path, step: int | None = None, accept_legacy: bool = False, say: Callable[[str], None] = warn
) -> Path:
    """The newest intact checkpoint of a run (or the one of `step`), verified as training verifies it. A newer one
    skipped is said in one line each (`say`); one named by `step` that cannot be used is an error with the reason."""
    tags = checkpoint.tags_newest_first(run_dir / "checkpoints")
    if not tags:
        raise StableTrainError(f"{run_dir} holds no complete checkpoint (no checkpoints/step_* directory)")
    if step is not None:
        tags = [t for t in tags if checkpoint.step_of(t) == step]
        if not tags:
            raise StableTrainError(f"{run_dir} has no checkpoint of step {step}")
    skipped: list[str] = []
    for tag_dir in tags:
        rejection = checkpoint.verify(tag_dir, accept_legacy, collective=False)
        if rejection is None:
            for why in skipped:
                say(f"skipping checkpoint {why}; using {tag_dir.name}")
            if checkpoint.legacy(tag_dir):
                say(
                    f"{tag_dir.name} has a manifest without digests (an older stabletrain's): used because "
                    "accept_legacy_checkpoints=true, but the content of its files is not checked"
                )
            return tag_dir
        if step is not None:
            raise StableTrainError(f"{tag_dir} cannot be used: {rejection}")
        skipped.append(f"{tag_dir.name}: {rejection}")
    raise StableTrainError(f"{run_dir} holds no usable checkpoint ({'; '.join(skipped)})")


def load_run(run_dir: str | Path, step: int | None = None, accept_legacy: bool = False) -> TrainedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise StableTrainError(f"{run_dir} is not a run directory (no config.yaml)")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    tag_dir = find_checkpoint(run_dir, step, accept_legacy)
    model_cfg = model_config_from_dict(saved["model"])
    weights = checkpoint.model_weights(tag_dir)
    if model_cfg.vocab_size is None:  # the run took it from its tokenizer: resolved.yaml says which size
        resolved = load_resolved(run_dir)
        model_cfg.vocab_size = resolved.vocab_size if resolved else weights["embed.weight"].shape[0]  # older runs
    return TrainedRun(
        run_dir, tag_dir, checkpoint.step_of(tag_dir), model_cfg, data_config(saved["data"]), saved, weights
    )


def model_from_export(export_dir: Path) -> Transformer:
    """The model of a `format=safetensors` export (config.yaml and model*.safetensors), in fp32, in eval mode."""
    saved = yaml.safe_load((export_dir / "config.yaml").read_text())
    weights = {k: v.float() for f in sorted(export_dir.glob("model*.safetensors")) for k, v in load_file(f).items()}
    cfg = model_config_from_dict(saved["model"])
    cfg.vocab_size = weights["embed.weight"].shape[0]
    model = build_model(cfg)
    model.load_state_dict(weights)
    return model.eval()
