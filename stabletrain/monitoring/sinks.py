"""Where metrics and events go, as callbacks on rank 0 (`trainer.callbacks`):

    console   the progress bar (logging.progress)
    metrics   <run_dir>/metrics.jsonl and events.jsonl: one JSON object per logged step / per event
    wandb     the W&B run (offline without an API key; none with logging.mode=disabled, which logging=none sets)

A torn last line (a crash mid-write) is dropped on start, and on resume the rows logged after the checkpoint
are removed, so metrics.jsonl always holds one timeline.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stabletrain.config import Config
from stabletrain.training.callbacks import CALLBACKS, Callback


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable instead of invalid
    return v


@CALLBACKS.register("console")
class Console(Callback):
    """The progress bar on rank 0: steps done of the run's last step, with loss, LR and tokens/s."""

    main_rank_only = True

    @classmethod
    def build(cls, trainer) -> "Console | None":
        return cls(trainer) if trainer.cfg.logging.progress else None

    def __init__(self, trainer):
        t = trainer.cfg.trainer
        self.bar = tqdm(
            total=t.stop_at or t.max_steps, initial=trainer.step, dynamic_ncols=True, mininterval=1.0, file=sys.stdout
        )

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            lr=f"{metrics['lr']:.2e}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            refresh=False,
        )

    def on_rewind(self, trainer, step: int) -> None:
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@CALLBACKS.register("metrics")
class MetricsFiles(Callback):
    """metrics.jsonl and events.jsonl in the run directory."""

    main_rank_only = True

    @classmethod
    def build(cls, trainer) -> "MetricsFiles":
        sink = cls(trainer.run_dir, trainer.resumed_step)
        for note in sink.repairs:
            trainer.say(note)
        return sink

    def __init__(self, run_dir: Path, resumed_step: int | None):
        self.metrics_path, self.events_path = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
        self.repairs: list[str] = []  # what was mended in files a crash left behind
        for path in (self.metrics_path, self.events_path):
            self._repair_torn_tail(path)
        if resumed_step is not None:
            self._truncate_after(resumed_step)
        self.metrics = open(self.metrics_path, "a", buffering=1)
        self.events = open(self.events_path, "a", buffering=1)

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
        self.repairs.append(
            f"{path.name}: dropped a torn final line ({len(data) - keep} bytes) left by an interrupted write"
        )

    def _truncate_after(self, step: int) -> None:
        """Rows logged after the checkpoint we resume from belong to a timeline that no longer exists."""
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

    def on_log(self, trainer, row: dict) -> None:
        self.metrics.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def on_event(self, trainer, kind: str, step: int, fields: dict) -> None:
        row = {"step": step, "kind": kind, "time": time.time(), **{k: _jsonable(v) for k, v in fields.items()}}
        self.events.write(json.dumps(row) + "\n")

    def on_rewind(self, trainer, step: int) -> None:
        self.metrics.close()
        self._truncate_after(step)
        self.metrics = open(self.metrics_path, "a", buffering=1)

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


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
    return [
        f"model={m.name}",
        f"residual={m.residual.kind}",
        f"ffn={m.ffn.kind}",
        f"layers={m.n_layers}",
        f"d_model={m.d_model}",
        f"engine={cfg.engine.name}",
        f"precision={cfg.precision.dtype}",
    ]


@CALLBACKS.register("wandb")
class WandbRun(Callback):
    """The W&B run, named after the run directory; a resumed run continues the same run id."""

    main_rank_only = True

    @classmethod
    def build(cls, trainer) -> "WandbRun | None":
        return cls(trainer.cfg, trainer.run_dir, trainer.composed) if trainer.cfg.logging.mode != "disabled" else None

    def __init__(self, cfg: Config, run_dir: Path, resolved_config: dict):
        import wandb  # an optional heavy import (1-2 s): only runs that log to W&B pay it

        self.wandb, self.step = wandb, 0
        id_file = run_dir / "wandb_run_id"
        alphabet = string.ascii_lowercase + string.digits
        run_id = (
            id_file.read_text().strip() if id_file.is_file() else "".join(secrets.choice(alphabet) for _ in range(8))
        )
        id_file.write_text(run_id + "\n")
        lg = cfg.logging
        self.run = wandb.init(
            project=lg.project,
            entity=lg.entity,
            name=lg.run_name or run_dir.name,
            group=lg.group,
            tags=list(lg.tags) or default_tags(cfg),
            config=resolved_config,
            dir=str(run_dir),
            mode=wandb_mode(lg.mode),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(quiet=True, console="off"),
        )  # our console is the bar

    def on_log(self, trainer, row: dict) -> None:
        # Lists are per-expert loads: a histogram over expert index in W&B.
        payload = {
            k: self.wandb.Histogram(np_histogram=(v, list(range(len(v) + 1)))) if isinstance(v, list) else _jsonable(v)
            for k, v in row.items()
            if k != "step"
        }
        if row["step"] >= self.step:  # W&B steps only grow: replayed steps after a rollback stay local
            self.run.log(payload, step=row["step"])
            self.step = row["step"]

    def on_event(self, trainer, kind: str, step: int, fields: dict) -> None:
        self.step = max(step, self.step)  # a rollback's event lands on the spike's step, the newest W&B knows
        self.run.log({f"events/{kind}": 1}, step=self.step)

    def on_alert(self, trainer, title: str, text: str, wait_s: float) -> None:
        """A W&B alert (email/Slack when the run is online); W&B itself drops repeats within wait_s."""
        url = trainer.cfg.logging.workspace_url
        text = f"{text}\ndashboard: {url}" if url else text
        self.run.alert(title=title, text=text, level=self.wandb.AlertLevel.WARN, wait_duration=wait_s)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before the W&B service has flushed the run file's last records (seen: the last
        # three steps missing when the file was read right after); teardown waits for the service to exit.
        self.wandb.teardown()
