"""Residual-stream policies. Adding one: a module with a ResidualStream subclass registered (with its config
dataclass) in RESIDUAL_STREAMS, imported below, and a preset YAML; nothing else changes."""

from stabletrain.models.residual import hyper, manifold  # noqa: F401  (they register themselves)
from stabletrain.models.residual.base import (
    RESIDUAL_STREAMS,
    Connection,
    PropagationScalar,
    ResidualStream,
    Sublayer,
    build_stream,
)

__all__ = ["RESIDUAL_STREAMS", "Connection", "PropagationScalar", "ResidualStream", "Sublayer", "build_stream"]
