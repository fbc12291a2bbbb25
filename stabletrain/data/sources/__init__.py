"""Document sources, all read through HF `datasets` streaming. A source kind is a registered component (SOURCES,
the config group data/source): its config dataclass (a subclass of stabletrain.config.SourceConfig: fields, checks,
fingerprint) and a reader class. Built in: hub datasets (hub.py) and local jsonl / parquet / text files (local.py);
stream.py turns any of them into the documents of a split."""

from stabletrain.data.sources.base import SOURCES, datasets_module, resolve_files, source_from_dict
from stabletrain.data.sources.hub import HubDataset, HubSourceConfig
from stabletrain.data.sources.local import LocalFiles, LocalSourceConfig
from stabletrain.data.sources.stream import DocumentStream, files_stream, iter_texts, open_source

__all__ = [
    "SOURCES",
    "DocumentStream",
    "HubDataset",
    "HubSourceConfig",
    "LocalFiles",
    "LocalSourceConfig",
    "datasets_module",
    "files_stream",
    "iter_texts",
    "open_source",
    "resolve_files",
    "source_from_dict",
]
