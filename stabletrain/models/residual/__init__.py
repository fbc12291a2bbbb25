"""Residual-stream policies. Adding one: a module with a ResidualStream subclass, an entry below, a YAML."""
from stabletrain.config import ModelConfig
from stabletrain.models.residual.base import Connection, PropagationScalar, ResidualStream


def build_stream(cfg: ModelConfig) -> ResidualStream:
    kind = cfg.residual.kind
    if kind == "standard":
        return ResidualStream()
    if kind == "hc":
        from stabletrain.models.residual.hyper import HyperStream

        return HyperStream(cfg.d_model, cfg.residual, cfg.norm_eps)
    if kind == "mhc":
        from stabletrain.models.residual.manifold import ManifoldStream

        return ManifoldStream(cfg.d_model, cfg.residual)
    raise ValueError(f"unknown residual kind {kind!r}")


__all__ = ["Connection", "PropagationScalar", "ResidualStream", "build_stream"]
