"""The registry of document sources and what the built-in kinds share."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from stabletrain import StableTrainError
from stabletrain.config.source import GROUP, SourceConfig
from stabletrain.registry import Registry

# A source kind: a class taking (its config, split) with `files` (local paths, or []), `builder` (how `datasets`
# reads them: json, parquet, text, ...), `desc`, `split`, `load(utf8_errors)` returning a `datasets` iterable
# dataset with one input shard per file and a text column, and `error(where, exc)` returning a one-line error.
SOURCES = Registry("data source", group=GROUP)

# Before sources were a config group, every source had the fields of every kind, with `kind` null. Tokenizers
# trained then are cached under a digest of that layout (data/<name>/tokenizer/sp<V>-<digest>.model), so the
# built-in kinds keep naming themselves in it: those tokenizers, and the token caches beside them, stay valid.
_FLAT = {
    "kind": None,
    "hf_id": None,
    "subset": None,
    "data_files": [],
    "split": "train",
    "val_split": None,
    "train_files": [],
    "val_files": [],
    "val_docs": 200,
    "text_field": "text",
    "max_docs": None,
    "weight": 1.0,
}


def flat_identity(src: SourceConfig) -> dict:
    return {**_FLAT, **{k: v for k, v in asdict(src).items() if k != "kind"}}


def source_from_dict(values: dict) -> SourceConfig:
    """A source config from `asdict` of one (prepare's workers receive theirs so)."""
    return SOURCES[values["kind"]].config(**values)


def resolve_files(patterns: Iterable[str], key: str = "data.source.train_files") -> list[str]:
    """Files named by paths and globs, each glob sorted, in the order given; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matched = (
            sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] if Path(pattern).is_file() else []
        )
        if not matched:
            raise StableTrainError(f"{key}: file not found: {pattern}")
        files += [os.path.abspath(f) for f in matched if Path(f).is_file()]
    return files


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def datasets_module():
    import datasets  # deferred: a 1-2 s import that only data preparation needs

    # Its json reader logs a parse error before raising it; we report the same error as one line.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    return datasets
