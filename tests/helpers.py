"""Shared helpers: run train.py as a user would, read run-directory files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# A model small enough for 2 CPU cores; the bundled corpus and tokenizer.
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64",
        "trainer.micro_batch_size=8", "trainer.eval_batches=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "logging.progress=false"]


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    e.pop("WANDB_API_KEY", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STABLETRAIN_RUN_STAMP"):
        e.pop(var, None)
    return e


def train(run_dir: Path | None, *overrides: str, nproc: int = 1, check: bool = True, timeout: int = 300,
          cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun when nproc > 1) with the TINY model and the given overrides.
    run_dir=None leaves the run directory to the default (outputs/<timestamp> under cwd)."""
    args = [*TINY, *overrides] + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])
    script = str(REPO / "train.py")
    if nproc > 1:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    else:
        cmd = [PYTHON, script, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (evaluation rows carry val_loss only)."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def val_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]


def compose_config(*overrides: str):
    """The composed (DictConfig) config tree with the given overrides, as train.py composes it."""
    from hydra import compose, initialize_config_dir

    from stabletrain.cli import setup

    setup()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def composed(*overrides: str):
    """The typed Config for these overrides."""
    from stabletrain.config import to_object

    return to_object(compose_config(*overrides))


def train_inprocess(run_dir: Path, *overrides: str) -> list[dict]:
    """Train in this process (no interpreter start-up, no DeepSpeed import per run); returns the training rows.
    For end-to-end tests where a separate process is not what is tested."""
    from stabletrain.cli.train import run

    run(compose_config(*TINY, "logging=none", *overrides), Path(run_dir))
    return train_rows(Path(run_dir))


def residual_config(kind: str = "standard", **fields):
    """The registered config of residual stream `kind` (what model/residual=<kind> selects)."""
    from stabletrain.models import RESIDUAL_STREAMS

    return RESIDUAL_STREAMS[kind].config(**fields)


def moe_config(router: str = "aux_free", **fields):
    """An MoEConfig with router `router` (what model/ffn=moe model/ffn/router=<router> selects); each keyword goes
    to whichever of the two configs has that field."""
    import dataclasses

    from stabletrain.models import ROUTERS
    from stabletrain.models.moe import MoEConfig

    router_cls = ROUTERS[router].config
    own = {f.name for f in dataclasses.fields(router_cls)}
    return MoEConfig(router=router_cls(**{k: v for k, v in fields.items() if k in own}),
                     **{k: v for k, v in fields.items() if k not in own})


def compose_data(overrides: list[str]):
    """The validated `data` node for these overrides (what the data CLIs compose)."""
    from stabletrain.cli import compose_config as compose_typed
    from stabletrain.config import validate_data

    data = compose_typed(list(overrides)).data
    validate_data(data)
    return data
