"""Registries: components register themselves by name; builders look them up; tests and the planner enumerate.

    RESIDUAL_STREAMS = Registry("residual stream", group="model/residual")

    @RESIDUAL_STREAMS.register("mhc", config=MHCConfig)
    class ManifoldStream(ResidualStream): ...

A registry tied to a Hydra config group also stores each entry's config dataclass as an option of that group
(`model/residual=mhc` selects it at compose time, and a misspelt field of it fails there, naming the key). The
dataclass is where that component's defaults live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from hydra.core.config_store import ConfigStore

from stabletrain import StableTrainError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    config: type | None = None


class Registry:
    def __init__(self, what: str, group: str | None = None):
        self.what, self.group = what, group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None, node: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register `obj` under `name`, and its config dataclass as option `node` (default: `name`) of
        the group. A YAML option of the same name that extends the node (e.g. to add a nested group's default)
        uses another node name."""

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name].obj is not obj:
                raise StableTrainError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, config)
            if self.group is not None and config is not None:
                ConfigStore.instance().store(group=self.group, name=node or name, node=config)
            return obj

        return add

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise StableTrainError(f"unknown {self.what} {name!r} (registered: {', '.join(self.names())})")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)
