"""Initial weights that do not depend on how the model is laid out over ranks.

Every parameter draws from a generator of its own, seeded from the run's seed and the parameter's name in the
unsharded model. A rank that allocates only its pipeline stage, its experts or its ZeRO-3 shard therefore produces
exactly the values the single-process model has there, and a new parameter elsewhere in the model moves no other
parameter's initial value. (On one device type: CPU and CUDA generators give different streams.)

The rule for a parameter comes from the module that owns it: a module with `init_parameter(local_name, tensor,
generator)` initialises its own parameters (residual connections, routers); Linear and Embedding weights are
normal(0, init_std), output projections with the depth-scaled std; norm gains are 1. Buffers (running statistics,
balancing biases, counters) start at zero.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
from torch import nn

from stabletrain.config import ModelConfig
from stabletrain.models.layers import RMSNorm

OUTPUT_PROJECTIONS = ("o_proj.weight", "w_down.weight")


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name` of a run seeded with `seed` (stable across processes and versions)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def param_generator(seed: int, name: str, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(param_seed(seed, name))


def output_std(cfg: ModelConfig) -> float:
    """The init std of attention and MLP output projections: init_std / sqrt(2 L) with the scaled rule, times the
    residual stream's own factor (model.residual.out_init_mult), times sqrt(n) where the stream asks for it (HC's
    model.residual.out_init_sqrt_n; a field of that stream's config only)."""
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.out_proj_init == "scaled" else cfg.init_std
    sqrt_n = math.sqrt(cfg.residual.streams) if getattr(cfg.residual, "out_init_sqrt_n", False) else 1.0
    return std * cfg.residual.out_init_mult * sqrt_n


@torch.no_grad()
def init_tensor(cfg: ModelConfig, name: str, module: nn.Module, tensor: torch.Tensor, seed: int) -> None:
    """Fill `tensor` with the initial value of parameter `name` (qualified, in the unsharded model) owned by
    `module`, from the parameter's own generator."""
    gen = param_generator(seed, name, tensor.device)
    local = name.rpartition(".")[2]
    if hasattr(module, "init_parameter"):
        module.init_parameter(local, tensor, gen)
    elif isinstance(module, nn.Linear) and local == "weight":
        tensor.normal_(0.0, output_std(cfg) if name.endswith(OUTPUT_PROJECTIONS) else cfg.init_std, generator=gen)
    elif isinstance(module, nn.Linear) and local == "bias":
        tensor.zero_()
    elif isinstance(module, nn.Embedding):
        tensor.normal_(0.0, cfg.init_std, generator=gen)
    elif isinstance(module, RMSNorm):
        tensor.fill_(1.0)
    else:
        raise TypeError(
            f"no initialisation rule for parameter {name} of {type(module).__name__}: give the module an "
            "init_parameter(local_name, tensor, generator) method"
        )


def named_parameter_owners(
    modules: Iterable[tuple[str, nn.Module]],
) -> Iterable[tuple[str, nn.Module, str, nn.Parameter]]:
    """(qualified name, owner, local name, parameter) of each module's own parameters, each parameter once (a tied
    weight under the first name it appears with)."""
    seen: set[int] = set()
    for prefix, module in modules:
        for local, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{prefix}.{local}" if prefix else local), module, local, p


def reset_own_parameters(module: nn.Module) -> None:
    """A module's constructor-time init of its own parameters through its init_parameter, from the global RNG
    (a module built on its own, outside a Transformer); nothing on the meta device."""
    with torch.no_grad():
        for local, p in module.named_parameters(recurse=False):
            if not p.is_meta:
                module.init_parameter(local, p, None)
