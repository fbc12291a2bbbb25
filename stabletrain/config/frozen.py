"""The configuration is read-only once validated: `freeze(cfg)` makes every dataclass node of the tree refuse
assignments (FrozenConfigError, naming the key), so nothing downstream patches it and config.yaml says exactly what
the run ran with. Values derived from it (world size, accumulation, global batch, vocabulary size, the layout) are
computed once into stabletrain.config.resolved.Resolved instead. `thawed(node)` is a writable deep copy, for the
few places that build a variant of a node (a one-off eager model for forensics, fake-tensor footprints).
"""

from __future__ import annotations

import copy
import dataclasses

from stabletrain.config.fields import ConfigError

_FLAG = "_stabletrain_frozen"


class FrozenConfigError(ConfigError):
    pass


def _guarded_setattr(self, name: str, value) -> None:
    if self.__dict__.get(_FLAG):
        raise FrozenConfigError(
            f"the configuration is read-only after validation: {type(self).__name__}.{name} cannot be set "
            "(derive a value into stabletrain.config.resolved, or build a copy with dataclasses.replace)"
        )
    object.__setattr__(self, name, value)


def _nodes(node):
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        yield node
        for f in dataclasses.fields(node):
            yield from _nodes(getattr(node, f.name))
    elif isinstance(node, dict):
        for v in node.values():
            yield from _nodes(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _nodes(v)


def freeze(cfg):
    """Make every dataclass node of `cfg` read-only, in place; returns cfg."""
    for node in _nodes(cfg):
        cls = type(node)
        if cls.__setattr__ is not _guarded_setattr:
            cls.__setattr__ = _guarded_setattr  # only frozen instances refuse
        node.__dict__[_FLAG] = True
    return cfg


def is_frozen(node) -> bool:
    return bool(getattr(node, "__dict__", {}).get(_FLAG))


def thawed(node):
    """A writable deep copy of a (possibly frozen) config node."""
    out = copy.deepcopy(node)
    for n in _nodes(out):
        n.__dict__.pop(_FLAG, None)
    return out
