"""A Hugging Face hub dataset, streamed (data/source=hub)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from stabletrain import StableTrainError
from stabletrain.config import ConfigError, SourceConfig
from stabletrain.data.sources.base import SOURCES, datasets_module, first_line, flat_identity


@dataclass
class HubSourceConfig(SourceConfig):
    """A Hugging Face hub dataset streamed with `datasets` (data=c4, pile, redpajama)."""

    kind: str = "hub"
    hf_id: Optional[str] = None  # hub dataset id, e.g. allenai/c4
    subset: Optional[str] = None  # hub config name, e.g. en
    data_files: List[str] = field(default_factory=list)  # json files inside the repo (no loading script)
    split: str = "train"  # hub split for training
    val_split: Optional[str] = None  # hub split held out for validation; None: hold out val_docs documents

    def check(self, data, key: str) -> None:
        if not self.hf_id:
            raise ConfigError(f"{key}.hf_id is empty (data/source=hub needs a dataset id, e.g. allenai/c4)")

    def separate_validation(self) -> bool:
        return bool(self.val_split)

    def split_name(self, split: str) -> str:
        return self.val_split if split == "val" and self.val_split else self.split

    def fingerprint(self, split: str) -> dict:
        return {
            "hf_id": self.hf_id,
            "subset": self.subset,
            "data_files": list(self.data_files),
            "split": self.split_name(split),
        }

    def identity(self) -> dict:
        return flat_identity(self)


def hub_error(desc: str, e: Exception) -> StableTrainError:
    first = first_line(e)
    offline = any(os.environ.get(v) in ("1", "true", "True") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if isinstance(e, (ConnectionError, OSError)) or offline or "offline" in first.lower():
        return StableTrainError(
            f"cannot stream {desc}: the Hugging Face hub is unreachable from here or offline mode is on "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) ({type(e).__name__}: {first}); run `python -m "
            "stabletrain.cli.prepare` where the hub is reachable and train with data.format=pretokenized data.path=DIR"
        )
    return StableTrainError(f"cannot load {desc}: {type(e).__name__}: {first}")


@SOURCES.register("hub", config=HubSourceConfig)
class HubDataset:
    """The split of a hub dataset, its files as `datasets` streams them (no local files)."""

    def __init__(self, src: HubSourceConfig, split: str):
        self.src, self.files, self.builder = src, [], None
        self.split = src.split_name(split)
        subset = f" (subset {src.subset!r})" if src.subset else ""
        self.desc = f"hub dataset {src.hf_id!r}{subset} split {self.split!r}"

    def load(self, utf8_errors: str):
        s = self.src
        if s.data_files:  # json files of a repo whose loading script `datasets` no longer runs
            files = [f"hf://datasets/{s.hf_id}/{p}" for p in s.data_files]
            return datasets_module().load_dataset("json", data_files=files, split=self.split, streaming=True)
        return datasets_module().load_dataset(s.hf_id, s.subset, split=self.split, streaming=True)

    def error(self, where: str, e: Exception) -> StableTrainError:
        return hub_error(self.desc, e)
