"""A residual stream defined outside the package, the way a user adds one: a module that registers it (loaded by
STABLETRAIN_PLUGINS=tests.toy_residual) plus a preset YAML. x + gate · F(norm(x)) per sublayer."""

from __future__ import annotations

from dataclasses import dataclass

from stabletrain.config import ResidualConfig
from stabletrain.config.fields import between
from stabletrain.models.residual import RESIDUAL_STREAMS, Connection, ResidualStream


@dataclass
class ToyConfig(ResidualConfig):
    kind: str = "toy"
    gate: float = between(0, 1, 0.5)


class GatedConnection(Connection):
    def __init__(self, gate: float, depth_scale, signal):
        super().__init__(depth_scale, signal)
        self.gate = gate

    def write(self, x, y, ctx):
        return x + self.gate * y


@RESIDUAL_STREAMS.register("toy", config=ToyConfig)
class ToyStream(ResidualStream):
    def __init__(self, d_model: int, cfg: ToyConfig, norm_eps: float):
        super().__init__()
        self.gate = cfg.gate

    def connection(self, sublayer_index, depth_scale, signal) -> Connection:
        return GatedConnection(self.gate, depth_scale, signal)
