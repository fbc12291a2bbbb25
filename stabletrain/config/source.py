"""What every document source has. Each kind (hub, local, a plugin's) is a registered subclass with its own fields,
checks and fingerprint (stabletrain/data/sources/), an option of the config group data/source; a mixture's entries
are plain dicts turned into the config of the kind they name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from stabletrain.config.fields import ConfigError, at_least, positive

GROUP = "data/source"


@dataclass
class SourceConfig:
    """The fields every source has: the base of each kind's config, itself no source (a single-source run selects
    one with data/source=<kind>, as the data presets do; a mixture names each entry's kind in data.sources)."""

    kind: str = ""  # the registered name: set by data/source=<name>, not by hand
    val_docs: int = at_least(0, 200)  # held out from the start of the training stream when there is no val split
    text_field: str = "text"  # the field holding the text (jsonl, parquet, hub)
    max_docs: Optional[int] = at_least(1, None)  # at most N training documents from each input shard
    weight: float = positive(1.0)  # mixture weight (normalised over data.sources)

    def check(self, data: Any, key: str) -> None:
        """Paths and cross-field rules of this source that need no network (ConfigError naming `key`.<field>);
        `data` is the DataConfig it belongs to. Subclasses extend."""

    def separate_validation(self) -> bool:
        """True when the source has validation documents of its own (a split, files); otherwise the first val_docs
        documents of the training stream are held out for validation."""
        return False

    def fingerprint(self, split: str) -> dict:
        """What determines the documents of `split` (train | val) beyond the shared fields: recorded in manifests and
        part of the token cache's key. Subclasses say what identifies theirs (files and their sizes, a dataset id)."""
        return {}

    def cache_text(self, fingerprint: dict) -> str:
        """The token cache's key material beside the tokenizer, given a stream's whole fingerprint."""
        return json.dumps(fingerprint, sort_keys=True)

    def identity(self) -> dict:
        """The source as plain data: names the tokenizer trained on it (data/<name>/tokenizer/sp<V>-<digest>)."""
        return asdict(self)

    def with_path(self, path: str) -> "SourceConfig":
        """This source reading `data.path` (format=text); only sources that read local files take one."""
        raise ConfigError(
            f"data.path={path} names local files, which data/source={self.kind} does not read "
            "(data/source=local reads them; data.format=pretokenized reads a prepared directory)"
        )


def source_classes() -> dict[str, type]:
    """kind -> config dataclass of every registered source (the options of data/source)."""
    group = ConfigStore.instance().repo.get("data", {}).get("source", {})
    return {
        name.removesuffix(".yaml"): OmegaConf.get_type(node.node)
        for name, node in group.items()
        if name.endswith(".yaml")
    }


def infer_kind(entry: dict) -> str:
    """An entry that names no kind: hub when it names a hub dataset, else local files (as before sources were a
    config group)."""
    return entry.get("kind") or ("hub" if entry.get("hf_id") else "local")


def source_from_entry(entry: Any, key: str) -> SourceConfig:
    """A mixture entry (a plain dict, so that `+data.sources.<name>={...}` works on the command line) as the config
    of its kind; a misspelt kind or key, or a wrong type, is one line naming `key`."""
    if isinstance(entry, SourceConfig):
        return entry
    entry = dict(entry)
    kind, classes = infer_kind(entry), source_classes()
    if kind not in classes:
        raise ConfigError(f"{key}.kind={kind}: no such data source (registered: {', '.join(sorted(classes))})")
    cls = classes[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(
            f"{key}: unknown key(s) {', '.join(unknown)} for a {kind} source (known: {', '.join(sorted(known))})"
        )
    defaults = cls()
    for f in fields(cls):  # a single path is a list of one
        if isinstance(entry.get(f.name), str) and isinstance(getattr(defaults, f.name), list):
            entry[f.name] = [entry[f.name]]
    entry["kind"] = kind
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), entry))
    except Exception as e:  # a wrong type: OmegaConf's message names the field
        raise ConfigError(f"{key}: {str(e).strip().splitlines()[0]}") from None


def moved_source_key(overrides: list[str], data_fields: set[str]) -> str | None:
    """An override of a source's field on `data` itself (data.text_field=..., data.kind=...: where they were before
    sources were a config group), as one line saying where it went; None when there is none. `data_fields`: the
    fields `data` still has."""
    classes = source_classes()
    moved = {f.name for cls in classes.values() for f in fields(cls)} - data_fields
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        name = key.removeprefix("data.")
        if key.startswith("data.") and name in moved:
            if name == "kind":
                return (
                    f"data.kind={value}: the source is a config group: use data/source={value or '<name>'} "
                    f"(registered: {', '.join(sorted(classes))})"
                )
            return f"{key} is a field of the source: data.source.{name}={value} (in a mixture: data.sources.<name>)"
    return None
