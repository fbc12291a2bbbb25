"""Pre-flight (`trainer.preflight=error|warn|off`): before anything is allocated, compare the planner's memory per
rank for the configured layout and micro-batch (weights, gradients, optimizer, activations with the configured
recomputation) with what this rank has: the free memory of its GPU, or on a CPU the available RAM shared by the
ranks of this node. Like the planner, a layout fits when it needs at most 90% of that.

When it does not fit, the one-line answer names the need, the capacity, and either the fastest layout that fits at
this world size or the smallest world size at which one fits, as the command that runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stabletrain.config import Config, global_batch_size
from stabletrain.planner.report import configured_layout, launch_command, user_overrides
from stabletrain.planner.search import HEADROOM, GiB, ModelProfile, estimate, search

LARGEST_WORLD = 2**14  # the search for a world size that fits stops here


@dataclass
class Capacity:
    bytes: float
    source: str


def capacity(device: torch.device, local_world: int) -> Capacity:
    """Memory this rank may use: free GPU memory, or this node's available RAM over its local ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Capacity(free, f"free memory of {torch.cuda.get_device_name(device)}")
    available = _available_ram()
    return Capacity(available / local_world, f"available RAM {available / GiB:.1f} GiB / {local_world} local rank(s)")


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024.0
    except (OSError, StopIteration):  # not Linux
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def needed_bytes(memory: dict[str, float], cfg: Config) -> float:
    """The device's share of an estimate: offloaded optimizer states (and ZeRO-3 parameters) live in host memory."""
    e = cfg.engine
    return sum(
        v
        for k, v in memory.items()
        if not (k == "optimizer" and e.offload_optimizer != "none")
        and not (k == "weights" and e.offload_param != "none")
    )


@dataclass
class Fit:
    fits: bool
    need: float
    capacity: Capacity
    message: str


def preflight(cfg: Config, world: int, local_world: int, device: torch.device) -> Fit:
    """Whether the configured layout fits this rank, and the one line that says so (or what to run instead)."""
    profile = ModelProfile(cfg)
    batch = global_batch_size(cfg, world)
    est = estimate(profile, configured_layout(cfg), world, batch)
    need, cap = needed_bytes(est.memory, cfg), capacity(device, local_world)
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in est.memory.items() if v)
    e, t = cfg.engine, cfg.trainer
    layout = f"ZeRO-{e.zero_stage}" + (f", {e.pipeline_stages} stages" if e.pipeline_stages > 1 else "")
    layout += f", ep {e.expert_parallel}" if e.expert_parallel > 1 else ""
    what = (
        f"model={cfg.model.name} needs {need / GiB:.1f} GiB per rank ({parts}; {layout}, {cfg.precision.dtype}, "
        f"{world} rank(s), micro-batch {t.micro_batch_size} x {cfg.data.seq_len}) and rank {_rank()} has "
        f"{cap.bytes / GiB:.1f} GiB ({cap.source}, {HEADROOM:.0%} usable)"
    )
    if need <= HEADROOM * cap.bytes:
        return Fit(True, need, cap, what)
    return Fit(False, need, cap, f"{what}; {_what_fits(cfg, profile, world, local_world, batch, cap)}")


def _what_fits(cfg: Config, profile: ModelProfile, world: int, per_node: int, batch: int, cap: Capacity) -> str:
    """The fastest layout that fits at this world size, else the smallest world size (powers of two) with one."""
    gib, overrides = cap.bytes / GiB, user_overrides()
    w = world
    while w <= LARGEST_WORLD:
        feasible, _ = search(cfg, w, gib, batch, profile=profile)
        if feasible:
            where = f"fastest layout that fits {w} rank(s)" if w == world else f"smallest world size that fits: {w}"
            return f"{where}: {launch_command(overrides, feasible[0], w, batch, per_node)}"
        w *= 2
    return f"no layout fits up to {LARGEST_WORLD} ranks of {gib:.1f} GiB at global batch {batch}"


def _rank() -> int:
    return int(os.environ.get("RANK", 0))
