"""A split of a source as a stream of documents in input shards, read as Arrow batches: faster than a dict per
record, and the only way to see the raw bytes of a string that is not valid UTF-8 (pyarrow stores them; converting
to Python would raise).

Non-UTF-8 bytes (data.utf8_errors): `replace` (default) decodes them as U+FFFD and counts the documents affected
(`invalid_utf8_docs` in prepare's manifest); `strict` raises naming the file. For plain-text files `datasets`
decodes, so there the count is of documents that contain U+FFFD after decoding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from stabletrain import StableTrainError
from stabletrain.config import SourceConfig
from stabletrain.data.sources.base import SOURCES
from stabletrain.data.sources.local import LocalSourceConfig

_BATCH = 256  # documents per Arrow batch


@dataclass
class DocumentStream:
    """The documents of one split of a source, as input shards that can be read independently (by prepare workers).
    The source itself (hub, local files, ...) is a registered kind (SOURCES, data/source=<kind>)."""

    src: SourceConfig
    split: str  # train | val
    utf8_errors: str = "replace"
    use_holdout: bool = True  # False: the whole training stream, even without a validation split
    holdout: list[int] | None = None  # held-out documents per leading input shard (computed when None)
    invalid_utf8_docs: int = 0  # documents whose bytes were not valid UTF-8 (replaced), counted as they are read

    def __post_init__(self):
        s = self.src
        # No validation split or files: the first val_docs documents of the training stream are the validation set.
        holds_out = self.use_holdout and not s.separate_validation()
        self.holdout_only = self.split == "val" and holds_out
        self.skip_holdout = self.split == "train" and holds_out
        self.source = SOURCES[s.kind].obj(s, self.split)
        self._files, self._kind, self.desc = self.source.files, self.source.builder, self.source.desc
        self._dataset = None

    @property
    def fingerprint(self) -> dict:
        """What determines this stream's documents (recorded in manifests and cache keys): the source's own
        fingerprint, and what every source shares (a split held out of the training stream differs from that
        stream only in `split`)."""
        s = self.src
        return {
            "kind": s.kind,
            "split": self.split,
            "source": s.fingerprint(self.split),
            "text_field": s.text_field,
            "holdout": s.val_docs if (self.holdout_only or self.skip_holdout) else 0,
            "max_docs": s.max_docs,
            "utf8_errors": self.utf8_errors,
        }

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
                        f"{', '.join(table.column_names)}; set data.source.text_field)"
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
                        f"(fields: {', '.join(record)}; set data.source.text_field)"
                    )
                yield record[self.src.text_field]
        except StableTrainError:
            raise
        except Exception as e:
            raise self.source.error(self.desc, e) from None


def open_source(
    src: SourceConfig, split: str, utf8_errors: str = "replace", holdout: list[int] | None = None
) -> DocumentStream:
    return DocumentStream(src, split, utf8_errors, holdout=holdout)


def files_stream(files: Iterable[str], text_field: str = "text") -> DocumentStream:
    """Every document of `files`, in order (no validation held out)."""
    return DocumentStream(LocalSourceConfig(train_files=list(files), text_field=text_field), "train", use_holdout=False)


def iter_texts(files: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in `files`, in order."""
    files = list(files)
    for f in files:
        if not Path(f).is_file():
            raise StableTrainError(f"data file not found: {f}")
    yield from files_stream(files, text_field)
