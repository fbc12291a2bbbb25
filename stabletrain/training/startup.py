"""Start-up that speaks: one line per phase (config, pre-flight (planner.preflight: an error when the layout does not
fit), data, meta build, parallelize, materialize, engine,
first step) with its time and the memory in use, so that a large start is never silent. Rank 0 prints the phases;
every rank prints what it materialized."""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from stabletrain import StableTrainError
from stabletrain.config import Config
from stabletrain.planner.preflight import preflight
from stabletrain.training.perf import GiB, resident_gib


def process_age() -> float:
    """Seconds since this process started (0 where /proc is missing): the config phase includes the imports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Startup:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.started = self.last = time.perf_counter() - process_age()
        self.steps, self.first_step_s = 0, 0.0

    def memory(self, device: torch.device | None) -> str:
        used = f"rss {resident_gib():.2f} GiB"
        if device is not None and device.type == "cuda":
            used += f", {device} {torch.cuda.memory_allocated(device) / GiB:.2f} GiB"
        return used

    def phase(self, name: str, detail: str = "", device: torch.device | None = None, every_rank: bool = False) -> None:
        """Print `name: detail (seconds since the last phase, memory)` on rank 0 (or on every rank)."""
        now = time.perf_counter()
        if self.rank == 0 or every_rank:
            text = f"{detail} " if detail else ""
            tqdm.write(f"stabletrain: {name}: {text}({now - self.last:.1f} s, {self.memory(device)})", file=sys.stdout)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.started

    def preflight(self, cfg: Config, world: int, device: torch.device) -> None:
        """Before anything is allocated: does the configured layout fit this rank's memory (trainer.preflight)?"""
        mode = cfg.trainer.preflight
        if mode == "off":
            return
        fit = preflight(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
        if not fit.fits and mode == "error":
            raise StableTrainError(f"does not fit: {fit.message} (trainer.preflight=warn starts anyway)")
        self.phase("preflight", ("fits: " if fit.fits else "warning: does not fit: ") + fit.message)

    def first_steps(self, metrics: dict, step: int, compiled: bool, device: torch.device) -> None:
        """The first step of this process ends the start-up; with compiled blocks, the second step's row gets the
        warm-up the first paid (perf/compile_s: the first step's time less the second's)."""
        self.steps += 1
        if self.steps == 1:
            self.first_step_s = metrics["step_time_s"]
            self.phase(
                "first step", f"step {step} took {self.first_step_s:.2f} s; started in {self.total():.1f} s", device
            )
        elif self.steps == 2 and compiled:
            metrics["perf/compile_s"] = max(0.0, self.first_step_s - metrics["step_time_s"])
