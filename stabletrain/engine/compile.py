"""`trainer.compile=true`: torch.compile each transformer block (torchtitan-style), applied from outside the
model. Blocks share their graphs, and the engine still sees the plain module; the first steps pay the compile."""

from __future__ import annotations

import torch._dynamo.config as dynamo_config
from torch import nn


def compile_blocks(model: nn.Module) -> None:
    # Layer-specific constants (e.g. LNS's 1/sqrt(l)) specialise a graph per layer: allow one per layer.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(model.blocks))
    for block in model.blocks:
        block.compile()
