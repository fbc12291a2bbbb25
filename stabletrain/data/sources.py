"""Document sources: local jsonl / parquet files read through HF `datasets`, plain-text files as one document each."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from stabletrain import StableTrainError

_DATASETS_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def iter_texts(files: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in `files`, in order."""
    for f in files:
        builder = _DATASETS_BUILDER.get(Path(f).suffix)
        if not Path(f).is_file():
            raise StableTrainError(f"data file not found: {f}")
        if builder is None:
            yield Path(f).read_text(encoding="utf-8")
            continue
        import datasets  # deferred: a 1-2 s import that only data preparation needs

        stream = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True)
        for i, record in enumerate(stream):
            if text_field not in record:
                raise StableTrainError(f"{f}: record {i} has no field {text_field!r} (set data.text_field)")
            yield record[text_field]
