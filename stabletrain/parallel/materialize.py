"""Materialization: the model is built on the meta device (shapes and structure, no memory); each rank then
allocates and initialises, directly on its training device, only the parameters it owns:

    data parallel (ZeRO 0-2)   everything
    pipeline stage             the modules of its stage's layers (the tied embedding on the first and last stage)
    expert parallelism         its own routed experts (the others were taken out of the model before this)
    ZeRO-3                     everything, one parameter at a time: allocated, initialised, cast, then partitioned,
                               so that no more than one whole parameter exists beside the rank's shards

Initial values come from stabletrain.models.init: one generator per parameter, seeded from the run's seed and the
parameter's name, so every layout starts from the single-process model's weights, bit for bit.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from stabletrain.models.init import init_tensor, named_parameter_owners

GiB = 1024**3


@dataclass
class Ownership:
    """What one rank holds: `owns(name)` for a qualified parameter or buffer name of the unsharded model;
    `shard(param)` partitions a materialized parameter in place (ZeRO-3) and returns the elements this rank keeps."""

    owns: Callable[[str], bool] = lambda name: True
    shard: Callable[[nn.Parameter], int] | None = None
    dtype: torch.dtype | None = None  # cast to this after initialisation (ZeRO-3 partitions in the training dtype)


def under(prefixes: Iterable[str]) -> Callable[[str], bool]:
    """owns(name) for the modules at the given qualified prefixes ("" owns everything)."""
    roots = tuple(p + "." if p else "" for p in prefixes)
    return lambda name: name.startswith(roots)


@dataclass
class Materialized:
    params: int  # parameter elements this rank holds (its shards under ZeRO-3)
    bytes: int
    seconds: float

    def describe(self, rank: int, device: torch.device) -> str:
        return (
            f"rank {rank} materialized {self.params:,} parameters ({self.bytes / GiB:.2f} GiB) on {device} in "
            f"{self.seconds:.1f} s"
        )


def materialize(
    model: nn.Module,
    device: torch.device,
    seed: int,
    ownership: Ownership | None = None,
    extra: Iterable[tuple[str, nn.Module]] = (),
) -> Materialized:
    """Allocate and initialise the meta parameters and buffers this rank owns, in place; the others stay on the
    meta device. `extra`: modules taken out of the model (expert parallelism's local experts) under their names in
    the unsharded model. `model.cfg` supplies the initialisation rules."""
    t0, own = time.perf_counter(), ownership or Ownership()
    modules = list(itertools.chain(model.named_modules(), extra))
    done: dict[int, nn.Parameter] = {}
    count = nbytes = 0
    for name, module, _, p in named_parameter_owners(modules):
        if not p.is_meta or not own.owns(name):
            continue
        tensor = torch.empty(p.shape, dtype=p.dtype, device=device)
        init_tensor(model.cfg, name, module, tensor, seed)
        new = nn.Parameter(tensor if own.dtype is None else tensor.to(own.dtype), requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)  # flags such as no_weight_decay
        done[id(p)] = new
        kept = own.shard(new) if own.shard is not None else new.numel()
        count, nbytes = count + kept, nbytes + kept * new.element_size()
    for prefix, module in modules:  # every use of a parameter (tied weights included) gets the new one
        for local, p in module._parameters.items():
            if p is not None and id(p) in done:
                module._parameters[local] = done[id(p)]
        for local, b in module._buffers.items():
            if b is not None and b.is_meta and own.owns(f"{prefix}.{local}" if prefix else local):
                module._buffers[local] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    return Materialized(count, nbytes, time.perf_counter() - t0)
