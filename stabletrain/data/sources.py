"""Document sources, all read through HF `datasets` streaming: hub datasets and local jsonl / parquet / text files.

A source is a stream of documents split into input shards (a local file, or a file of a hub dataset). The
streams are read as Arrow batches: faster than a dict per record, and the only way to see the raw bytes of a
string that is not valid UTF-8 (pyarrow stores them; converting to Python would raise).

Non-UTF-8 bytes (data.utf8_errors): `replace` (default) decodes them as U+FFFD and counts the documents affected
(`invalid_utf8_docs` in prepare's manifest); `strict` raises naming the file. For plain-text files `datasets`
decodes, so there the count is of documents that contain U+FFFD after decoding.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from stabletrain import StableTrainError
from stabletrain.config import SourceConfig
from stabletrain.registry import Registry

_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # anything else: plain text, one doc per file
_BATCH = 256  # documents per Arrow batch


def resolve_files(patterns: Iterable[str], key: str = "data.train_files") -> list[str]:
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


_COMPRESSED = (".zst", ".gz", ".bz2", ".xz")  # datasets decompresses these (zstandard for .zst, e.g. the Pile)


def _kind(path: str) -> str:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return _BUILDER.get(suffixes[-1] if suffixes else "", "text")


def _builder(files: list[str], key: str) -> str:
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise StableTrainError(f"{key} mixes file types ({', '.join(sorted(kinds))}); use one source per type")
    return kinds.pop()


def _hub_error(desc: str, e: Exception) -> StableTrainError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = any(os.environ.get(v) in ("1", "true", "True") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if isinstance(e, (ConnectionError, OSError)) or offline or "offline" in first.lower():
        return StableTrainError(
            f"cannot stream {desc}: the Hugging Face hub is unreachable from here or offline mode is on "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) ({type(e).__name__}: {first}); run `python -m "
            "stabletrain.cli.prepare` where the hub is reachable and train with data.format=pretokenized data.path=DIR"
        )
    return StableTrainError(f"cannot load {desc}: {type(e).__name__}: {first}")


SOURCES = Registry("data source")


@SOURCES.register("hub")
class HubDataset:
    """A Hugging Face hub dataset (`data.hf_id`, `subset`, `split`, `val_split`, `data_files`), streamed."""

    def __init__(self, src: SourceConfig, split: str):
        self.src, self.files, self.builder = src, [], None
        self.split = src.val_split if split == "val" and src.val_split else src.split
        subset = f" (subset {src.subset!r})" if src.subset else ""
        self.desc = f"hub dataset {src.hf_id!r}{subset} split {self.split!r}"

    def load(self, utf8_errors: str):
        s = self.src
        if s.data_files:  # json files of a repo whose loading script `datasets` no longer runs
            files = [f"hf://datasets/{s.hf_id}/{p}" for p in s.data_files]
            return datasets_module().load_dataset("json", data_files=files, split=self.split, streaming=True)
        return datasets_module().load_dataset(s.hf_id, s.subset, split=self.split, streaming=True)

    def error(self, where: str, e: Exception) -> StableTrainError:
        return _hub_error(self.desc, e)


@SOURCES.register("local")
class LocalFiles:
    """Local files and globs (`data.train_files`, `val_files`, or `data.path`): jsonl (also .zst/.gz), parquet, or
    plain text (one file = one document)."""

    def __init__(self, src: SourceConfig, split: str):
        key = "data.val_files" if split == "val" and src.val_files else "data.train_files"
        self.src, self.split = src, split
        self.files = resolve_files(src.val_files if key == "data.val_files" else src.train_files, key)
        self.builder = _builder(self.files, key)
        more = f" (+{len(self.files) - 3} files)" if len(self.files) > 3 else ""
        self.desc = ", ".join(self.files[:3]) + more

    def load(self, utf8_errors: str):
        extra = {"sample_by": "document", "encoding_errors": utf8_errors} if self.builder == "text" else {}
        return datasets_module().load_dataset(self.builder, data_files=self.files, split="train", streaming=True,
                                              **extra)  # fmt: skip

    def error(self, where: str, e: Exception) -> StableTrainError:
        """One line naming the file for whatever `datasets`/pyarrow raise while reading it."""
        if isinstance(e, UnicodeDecodeError):  # plain text with utf8_errors=strict: `datasets` decodes those files
            return StableTrainError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                    "data.utf8_errors=replace decodes such bytes as U+FFFD")  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return StableTrainError(f"{where}: cannot be read as {self.builder} ({type(e).__name__}: {first})")


def datasets_module():
    import datasets  # deferred: a 1-2 s import that only data preparation needs

    # Its json reader logs a parse error before raising it; we report the same error as one line.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    return datasets


@dataclass
class DocumentStream:
    """The documents of one split of a source, as input shards that can be read independently (by prepare workers).
    The source itself (hub, local files, ...) is a registered kind (SOURCES, `data.kind`)."""

    src: SourceConfig
    split: str  # train | val
    utf8_errors: str = "replace"
    use_holdout: bool = True  # False: the whole training stream, even without a validation split
    holdout: list[int] | None = None  # held-out documents per leading input shard (computed when None)
    invalid_utf8_docs: int = 0  # documents whose bytes were not valid UTF-8 (replaced), counted as they are read

    def __post_init__(self):
        s = self.src
        # No validation split or files: the first val_docs documents of the training stream are the validation set.
        holds_out = self.use_holdout and not s.val_split and not s.val_files
        self.holdout_only = self.split == "val" and holds_out
        self.skip_holdout = self.split == "train" and holds_out
        self.source = SOURCES[s.source_kind].obj(s, self.split)
        self._files, self._kind, self.desc = self.source.files, self.source.builder, self.source.desc
        self._dataset = None

    @property
    def fingerprint(self) -> dict:
        """What determines this stream's documents (recorded in manifests and cache keys)."""
        s = self.src
        files = [{"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns} for f in self._files]
        return {"hf_id": s.hf_id, "subset": s.subset, "data_files": list(s.data_files), "split": self.source.split,
                "files": files, "text_field": s.text_field,
                "holdout": s.val_docs if (self.holdout_only or self.skip_holdout) else 0, "max_docs": s.max_docs,
                "utf8_errors": self.utf8_errors}  # fmt: skip

    def dataset(self):
        """The `datasets` IterableDataset (opened once; a hub source fails here when the hub is unreachable)."""
        if self._dataset is None:
            try:
                self._dataset = self.source.load(self.utf8_errors)
            except StableTrainError:
                raise
            except StopIteration:  # `datasets` infers the columns from the first record
                raise StableTrainError(f"{self.desc} yielded no documents (empty file?)") from None
            except Exception as e:  # network, auth, missing subset, unreadable file: one line naming it
                raise self.source.error(self.desc, e) from None
        return self._dataset

    @property
    def num_shards(self) -> int:
        return len(self.holdout_layout()) if self.holdout_only else self.dataset().num_shards

    def _shard(self, index: int):
        ds = self.dataset()
        return ds.shard(num_shards=ds.num_shards, index=index) if ds.num_shards > 1 else ds

    def holdout_layout(self) -> list[int]:
        """How many of the first val_docs documents of the stream lie in each leading input shard (rows are
        counted, not decoded; only as many shards are read as the holdout needs)."""
        if self.holdout is None:
            self.holdout, remaining = [], self.src.val_docs if (self.holdout_only or self.skip_holdout) else 0
            for index in range(self.dataset().num_shards):
                if remaining <= 0:
                    break
                rows = 0
                try:
                    for table in self._shard(index).with_format("arrow").iter(batch_size=_BATCH):
                        rows += table.num_rows
                        if rows >= remaining:
                            break
                except Exception as e:
                    raise self._read_error(self.shard_name(index), e) from None
                self.holdout.append(min(rows, remaining))
                remaining -= self.holdout[-1]
        return self.holdout

    def shard_name(self, index: int) -> str:
        if self._files and len(self._files) == self.dataset().num_shards:
            return self._files[index]
        return f"{self.desc} shard {index}"

    def iter_shard(self, index: int) -> Iterator[str]:
        """The documents of input shard `index`, in order. Without a validation split the first val_docs documents
        of the stream are the validation set and training skips them."""
        ds = self._shard(index)  # one file each: what split_dataset_by_node assigns to a rank or worker
        layout = self.holdout_layout() if (self.holdout_only or self.skip_holdout) else []
        held = layout[index] if index < len(layout) else 0
        skip = held if self.skip_holdout else 0
        limit = held if self.holdout_only else None  # max_docs caps each input shard's training documents:
        if limit == 0:
            return
        if self.split == "train" and self.src.max_docs is not None:
            limit = skip + self.src.max_docs
        n = 0
        where = self.shard_name(index)
        try:
            for table in ds.with_format("arrow").iter(batch_size=_BATCH):
                if self.src.text_field not in table.column_names:
                    raise StableTrainError(
                        f"{where}: record {n} has no field {self.src.text_field!r} (fields: "
                        f"{', '.join(table.column_names)}; set data.text_field)"
                    )
                column = table.column(self.src.text_field)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise StableTrainError(f"{where}: field {self.src.text_field!r} holds {column.type}, not text")
                for raw in column.cast(pa.large_binary()).to_pylist():
                    n += 1
                    if n <= skip:
                        continue
                    if limit is not None and n > limit:
                        return
                    yield self._decode(raw, where, n - 1)
        except StableTrainError:
            raise
        except Exception as e:
            raise self._read_error(where, e) from None

    def _read_error(self, where: str, e: Exception) -> StableTrainError:
        return e if isinstance(e, StableTrainError) else self.source.error(where, e)

    def _decode(self, raw: bytes | None, where: str, record: int) -> str:
        if raw is None:
            return ""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.utf8_errors == "strict":
                raise StableTrainError(
                    f"{where}: record {record} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                    "data.utf8_errors=replace decodes such bytes as U+FFFD"
                ) from None
            self.invalid_utf8_docs += 1
            return raw.decode("utf-8", errors="replace")
        if self._kind == "text" and "\ufffd" in text:
            self.invalid_utf8_docs += 1  # `datasets` already replaced this plain-text file's invalid bytes
        return text

    def __iter__(self) -> Iterator[str]:
        """All documents of the split, input shard after input shard."""
        for index in range(self.num_shards):
            yield from self.iter_shard(index)

    def sample(self, n: int, seed: int = 0) -> Iterator[str]:
        """About n documents drawn with `datasets`' streaming shuffle (shard order plus a buffer), for tokenizer
        training."""
        if self.holdout_only or self._files:
            # Local files: the first n documents in a shard order shuffled by the seed.
            order = list(range(self.num_shards))
            random.Random(seed).shuffle(order)
            count = 0
            for index in order:
                for text in self.iter_shard(index):
                    if count >= n:
                        return
                    count += 1
                    yield text
            return
        ds = self.dataset().shuffle(seed=seed, buffer_size=10_000).take(n)
        try:
            for record in ds:
                if self.src.text_field not in record:
                    raise StableTrainError(
                        f"{self.desc}: record has no field {self.src.text_field!r} "
                        f"(fields: {', '.join(record)}; set data.text_field)"
                    )
                yield record[self.src.text_field]
        except StableTrainError:
            raise
        except Exception as e:
            raise _hub_error(self.desc, e) from None


def open_source(
    src: SourceConfig, split: str, utf8_errors: str = "replace", holdout: list[int] | None = None
) -> DocumentStream:
    return DocumentStream(src, split, utf8_errors, holdout=holdout)


def iter_texts(files: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in `files`, in order."""
    files = list(files)
    for f in files:
        if not Path(f).is_file():
            raise StableTrainError(f"data file not found: {f}")
    yield from DocumentStream(SourceConfig(train_files=files, text_field=text_field), "train", use_holdout=False)
