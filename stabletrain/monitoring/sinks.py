"""Where metrics and events go: metrics.jsonl / events.jsonl in the run directory, W&B, and the console.

Only rank 0 builds a MetricsLogger; other ranks get NullLogger and write nothing.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

from stabletrain.config import Config


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable instead of invalid
    return v


def wandb_mode(requested: str) -> str:
    """online only with credentials; W&B raises UsageError without a key, so pick offline ourselves."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def default_tags(cfg: Config) -> list[str]:
    """What a dashboard filters on: model variant and size, residual stream, FFN, engine, precision."""
    m = cfg.model
    return [f"model={m.name}", f"residual={m.residual.kind}", f"ffn={m.ffn.kind}", f"layers={m.n_layers}",
            f"d_model={m.d_model}", f"engine={cfg.engine.name}", f"precision={cfg.precision.dtype}"]


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, resolved_config: dict, resumed_step: int | None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self.repairs: list[str] = []  # what was mended in files a crash left behind (the trainer prints these)
        for path in (self.metrics_path, self.events_path):
            self._repair_torn_tail(path)
        if resumed_step is not None:
            self._truncate_metrics_after(resumed_step)
        self.metrics = open(self.metrics_path, "a", buffering=1)
        self.events = open(self.events_path, "a", buffering=1)
        self.wandb, self.wandb_step = None, 0
        if cfg.logging.wandb:
            self.wandb = self._init_wandb(cfg, resolved_config)

    def _repair_torn_tail(self, path: Path) -> None:
        """A crash in the middle of a write leaves a final line without its newline: drop it, so that appending
        does not glue the next row onto it."""
        if not path.is_file() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        self.repairs.append(f"{path.name}: dropped a torn final line ({len(data) - keep} bytes) left by an "
                            "interrupted write")

    def _truncate_metrics_after(self, step: int) -> None:
        # Rows logged after the checkpoint we resume from belong to a timeline that no longer exists.
        if not self.metrics_path.is_file():
            return
        rows = self.metrics_path.read_text(errors="replace").splitlines()
        kept = []
        for r in rows:
            try:
                if r.strip() and json.loads(r).get("step", 0) <= step:
                    kept.append(r)
            except (ValueError, AttributeError):
                self.repairs.append(f"{self.metrics_path.name}: dropped a line that is not a JSON object: {r[:60]!r}")
        if len(kept) != len(rows):
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, self.metrics_path)

    def _init_wandb(self, cfg: Config, resolved_config: dict):
        import wandb

        mode = wandb_mode(cfg.logging.mode)
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
        lg = cfg.logging
        run = wandb.init(project=lg.project, entity=lg.entity, name=lg.run_name or self.run_dir.name,
                         group=lg.group, tags=list(lg.tags) or default_tags(cfg), config=resolved_config,
                         dir=str(self.run_dir),
                         mode=mode, id=run_id, resume="allow",
                         settings=wandb.Settings(quiet=True, console="off"))  # our console is the progress bar
        return run

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        self.metrics.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            import wandb

            # Lists are per-expert loads: a histogram over expert index in W&B.
            payload = {k: wandb.Histogram(np_histogram=(v, list(range(len(v) + 1)))) if isinstance(v, list) else v
                       for k, v in row.items() if k != "step"}
            if row["step"] >= self.wandb_step:  # W&B steps only grow: replayed steps after a rollback stay local
                self.wandb.log(payload, step=row["step"])
                self.wandb_step = row["step"]

    def event(self, kind: str, step: int, **fields: Any) -> None:
        row = {"step": step, "kind": kind, "time": time.time(), **{k: _jsonable(v) for k, v in fields.items()}}
        self.events.write(json.dumps(row) + "\n")
        if self.wandb is not None:  # a rollback's event lands on the spike's step, the newest W&B knows
            self.wandb_step = max(step, self.wandb_step)
            self.wandb.log({f"events/{kind}": 1}, step=self.wandb_step)

    def alert(self, title: str, text: str, wait_s: float) -> None:
        """A W&B alert (email/Slack when the run is online); W&B itself drops repeats within wait_s."""
        if self.wandb is not None:
            import wandb

            self.wandb.alert(title=title, text=text, level=wandb.AlertLevel.WARN, wait_duration=wait_s)

    def rewind(self, step: int) -> None:
        """After a rollback: rows past `step` belong to an abandoned timeline (W&B keeps its own history)."""
        self.metrics.close()
        self._truncate_metrics_after(step)
        self.metrics = open(self.metrics_path, "a", buffering=1)

    def close(self) -> None:
        self.metrics.close()
        self.events.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NullLogger:
    """What non-zero ranks use: same interface, no output."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, step: int, **fields: Any) -> None:
        pass

    def alert(self, title: str, text: str, wait_s: float) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
