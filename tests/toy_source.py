"""A data source defined outside the package, the way a user adds one: a module that registers it (loaded by
STABLETRAIN_PLUGINS=tests.toy_source) plus a data preset YAML. Its documents are the scenes of the plays in a jsonl
file (data/shakespeare/*.jsonl): each play cut at its SCENE headings, scenes shorter than min_chars dropped."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stabletrain import StableTrainError
from stabletrain.config import ConfigError, SourceConfig
from stabletrain.config.fields import at_least
from stabletrain.data.sources import SOURCES, datasets_module


@dataclass
class ScenesConfig(SourceConfig):
    """The scenes of whole plays (a jsonl file of them)."""

    kind: str = "scenes"
    plays: str = ""  # a jsonl file of plays
    val_plays: str = ""  # held-out plays; empty: the first val_docs scenes are held out
    min_chars: int = at_least(1, 200)  # shorter scenes are dropped

    def check(self, data, key: str) -> None:
        for name in ("plays", "val_plays"):
            path = getattr(self, name)
            if (path or name == "plays") and not Path(path).is_file():
                raise ConfigError(f"{key}.{name}: file not found: {path}")

    def separate_validation(self) -> bool:
        return bool(self.val_plays)

    def path(self, split: str) -> str:
        return os.path.abspath(self.val_plays if split == "val" and self.val_plays else self.plays)

    def fingerprint(self, split: str) -> dict:
        st = os.stat(self.path(split))
        return {"plays": self.path(split), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "min_chars": self.min_chars}


def scenes(paths: list[str], min_chars: int):
    for path in paths:
        for line in Path(path).read_text().splitlines():
            for scene in re.split(r"\n(?=SCENE )", json.loads(line)["text"])[1:]:  # [0]: the title and the cast
                if len(scene) >= min_chars:
                    yield {"text": scene}


@SOURCES.register("scenes", config=ScenesConfig)
class Scenes:
    def __init__(self, src: ScenesConfig, split: str):
        self.src, self.split = src, split
        self.files, self.builder = [src.path(split)], "generator"
        self.desc = f"the scenes of {self.files[0]}"

    def load(self, utf8_errors: str):
        generator = datasets_module().IterableDataset.from_generator
        return generator(scenes, gen_kwargs={"paths": self.files, "min_chars": self.src.min_chars})

    def error(self, where: str, e: Exception) -> StableTrainError:
        return StableTrainError(f"{where}: {type(e).__name__}: {e}")
