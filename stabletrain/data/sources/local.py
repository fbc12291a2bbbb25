"""Local files and globs (data/source=local): jsonl (also .zst/.gz), parquet, or plain text (one file = one
document)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List

from stabletrain import StableTrainError
from stabletrain.config import ConfigError, SourceConfig
from stabletrain.data.sources.base import SOURCES, datasets_module, first_line, flat_identity, resolve_files

_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # anything else: plain text, one doc per file
_COMPRESSED = (".zst", ".gz", ".bz2", ".xz")  # datasets decompresses these (zstandard for .zst, e.g. the Pile)


@dataclass
class LocalSourceConfig(SourceConfig):
    """Local files (data=local with data.path=<glob>, data=shakespeare, data=kjv)."""

    kind: str = "local"
    train_files: List[str] = field(default_factory=list)  # jsonl, parquet or plain-text files or globs
    val_files: List[str] = field(default_factory=list)  # empty: hold out val_docs documents

    def check(self, data, key: str) -> None:
        if not self.train_files:
            hint = " (data=local needs data.path=<glob of jsonl/parquet/txt files>)" if not data.sources else ""
            raise ConfigError(f"{key}.train_files is empty{hint}")
        for name in ("train_files", "val_files"):
            for pattern in getattr(self, name):
                if not (glob.glob(pattern) if glob.has_magic(pattern) else Path(pattern).is_file()):
                    raise ConfigError(f"{key}.{name}: file not found: {pattern}")

    def separate_validation(self) -> bool:
        return bool(self.val_files)

    def files(self, split: str) -> tuple[list[str], str]:
        """(the files of `split`, the key that names them)."""
        if split == "val" and self.val_files:
            return resolve_files(self.val_files, "data.source.val_files"), "data.source.val_files"
        return resolve_files(self.train_files, "data.source.train_files"), "data.source.train_files"

    def fingerprint(self, split: str) -> dict:
        stats = [(f, os.stat(f)) for f in self.files(split)[0]]
        return {"files": [{"path": f, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for f, st in stats]}

    def cache_text(self, fingerprint: dict) -> str:
        # The key the bundled corpus's caches were written with: each file's path, size and mtime with the text
        # field; the whole fingerprint only where held-out documents, a cap or strict decoding change the stream.
        fp = fingerprint
        files = fp["source"]["files"]
        text = "".join(f"{f['path']}:{f['bytes']}:{f['mtime_ns']}:{fp['text_field']}" for f in files)
        plain = not fp["holdout"] and fp["max_docs"] is None and fp["utf8_errors"] == "replace"
        return text if plain else text + json.dumps(fp, sort_keys=True)

    def identity(self) -> dict:
        return flat_identity(self)

    def with_path(self, path: str) -> "LocalSourceConfig":
        return replace(self, train_files=[path])


def _file_kind(path: str) -> str:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return _BUILDER.get(suffixes[-1] if suffixes else "", "text")


def _builder(files: list[str], key: str) -> str:
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise StableTrainError(f"{key} mixes file types ({', '.join(sorted(kinds))}); use one source per type")
    return kinds.pop()


@SOURCES.register("local", config=LocalSourceConfig)
class LocalFiles:
    """The files of one split, read by the `datasets` builder their suffix names."""

    def __init__(self, src: LocalSourceConfig, split: str):
        self.src, self.split = src, split
        self.files, key = src.files(split)
        self.builder = _builder(self.files, key)
        more = f" (+{len(self.files) - 3} files)" if len(self.files) > 3 else ""
        self.desc = ", ".join(self.files[:3]) + more

    def load(self, utf8_errors: str):
        extra = {"sample_by": "document", "encoding_errors": utf8_errors} if self.builder == "text" else {}
        return datasets_module().load_dataset(
            self.builder, data_files=self.files, split="train", streaming=True, **extra
        )

    def error(self, where: str, e: Exception) -> StableTrainError:
        """One line naming the file for whatever `datasets`/pyarrow raise while reading it."""
        if isinstance(e, UnicodeDecodeError):  # plain text with utf8_errors=strict: `datasets` decodes those files
            return StableTrainError(
                f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                "data.utf8_errors=replace decodes such bytes as U+FFFD"
            )
        return StableTrainError(f"{where}: cannot be read as {self.builder} ({type(e).__name__}: {first_line(e)})")
