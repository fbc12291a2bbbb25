"""Shared helpers: train as a user would (in this process, or through train.py / torchrun where the process is what
is tested), compose configs, read run-directory files."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from stabletrain.cli import compose_config as compose_typed
from stabletrain.cli import setup
from stabletrain.cli.train import run
from stabletrain.config import check_overrides, to_object, validate_data
from stabletrain.distributed import STOP_SIGNALS
from stabletrain.models import RESIDUAL_STREAMS, ROUTERS
from stabletrain.models.moe import MoEConfig

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# A model small enough for 2 CPU cores; the bundled corpus and tokenizer.
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=64",
    "trainer.micro_batch_size=8",
    "trainer.eval_batches=2",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "logging.progress=false",
]


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    e.pop("WANDB_API_KEY", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STABLETRAIN_RUN_STAMP"):
        e.pop(var, None)
    return e


def train(
    run_dir: Path | None,
    *overrides: str,
    nproc: int = 1,
    check: bool = True,
    timeout: int = 300,
    cwd: Path = REPO,
    subprocess_: bool = False,
    tiny: bool = True,
) -> subprocess.CompletedProcess:
    """Train the TINY model with the given overrides, as train.py would: in this process by default (what a run
    does is the same; the interpreter start-up and the DeepSpeed import are not paid again), through train.py
    when `subprocess_` or `run_dir` is None, under torchrun when nproc > 1; `tiny=False` keeps the preset's sizes.
    Returns the exit status and output."""
    args = [*(TINY if tiny else ["logging.progress=false"]), *overrides]
    if nproc == 1 and not subprocess_ and run_dir is not None and cwd == REPO:
        proc = _train_here(Path(run_dir), args)
    else:
        args += [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
        script = str(REPO / "train.py")
        launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [*(launcher if nproc > 1 else [PYTHON]), script, *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _train_here(run_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    """What `python train.py <args> hydra.run.dir=<run_dir>` does, in this process."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    setup()
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}  # a signal-stopped run ignores further stops
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        error = check_overrides(args, REPO / "conf")
        if error:
            print(f"stabletrain: config error: {error}", file=sys.stderr)
            status = 1
        else:
            try:
                run(compose_config(*args), run_dir)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            finally:
                for s, handler in handlers.items():
                    signal.signal(s, handler)
    return subprocess.CompletedProcess(["train.py", *args], status, out.getvalue(), err.getvalue())


def train_jobs(jobs: list[tuple], nproc: int, timeout: int = 900, dump_init: tuple[Path, ...] = ()) -> dict[Path, int]:
    """Train the TINY model in several configurations, one after another, in one torchrun launch of `nproc` ranks
    (tests/dist_jobs.py); a run directory may appear twice (interrupted, then resumed). Run directories in
    `dump_init` only build the trainer and save each rank's initial weights (init_rank<r>.pt). A job is (run_dir,
    overrides) or (run_dir, overrides, ["module:function", *args]): rank 0 calls the function before the job, the
    other ranks wait (e.g. to damage a checkpoint between two jobs). Returns each run directory's last exit status."""
    spec = [{"run_dir": str(job[0]), "overrides": [*TINY, *job[1]], "dump_init": Path(job[0]) in dump_init,
             "before": job[2] if len(job) > 2 else None} for job in jobs]  # fmt: skip
    first = Path(jobs[0][0])
    first.parent.mkdir(parents=True, exist_ok=True)
    jobs_file = first.parent / f"{first.name}.jobs.json"
    jobs_file.write_text(json.dumps(spec))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tests.dist_jobs",
           str(jobs_file)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    dirs = {Path(job[0]) for job in jobs}
    status = {d: int((d / "exit_status").read_text()) for d in dirs if (d / "exit_status").exists()}
    if proc.returncode != 0 or len(status) < len(dirs):
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return status


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (evaluation rows carry val_loss only)."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def val_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]


def compose_config(*overrides: str):
    """The composed (DictConfig) config tree with the given overrides, as train.py composes it."""
    setup()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def composed(*overrides: str):
    """The typed Config for these overrides."""
    return to_object(compose_config(*overrides))


def train_inprocess(run_dir: Path, *overrides: str) -> list[dict]:
    """Train in this process with logging off; returns the training rows."""
    train(run_dir, "logging=none", *overrides)
    return train_rows(Path(run_dir))


def residual_config(kind: str = "standard", **fields):
    """The registered config of residual stream `kind` (what model/residual=<kind> selects)."""
    return RESIDUAL_STREAMS[kind].config(**fields)


def moe_config(router: str = "aux_free", **fields) -> MoEConfig:
    """An MoEConfig with router `router` (what model/ffn=moe model/ffn/router=<router> selects); each keyword goes
    to whichever of the two configs has that field."""
    router_cls = ROUTERS[router].config
    own = {f.name for f in dataclasses.fields(router_cls)}
    return MoEConfig(
        router=router_cls(**{k: v for k, v in fields.items() if k in own}),
        **{k: v for k, v in fields.items() if k not in own},
    )


def compose_data(overrides: list[str]):
    """The validated `data` node for these overrides (what the data CLIs compose)."""
    data = compose_typed(list(overrides)).data
    validate_data(data)
    return data


def one_rank_trainer(model):
    """What callbacks see of a trainer in a one-rank, unpipelined run: the model and the engine's collectives."""
    from types import SimpleNamespace

    engine = SimpleNamespace(stage_gather=lambda obj: [obj], stage_blocks=lambda: range(len(model.blocks)))
    return SimpleNamespace(model=model, engine=engine)


def tensor_paths(x, prefix: str, out: dict | None = None) -> dict:
    """Every tensor inside nested dicts/lists/tuples, keyed by its path (prefix/key/index...)."""
    out = {} if out is None else out
    if torch.is_tensor(x):
        out[prefix] = x
    elif isinstance(x, dict):
        for k, v in x.items():
            tensor_paths(v, f"{prefix}/{k}", out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            tensor_paths(v, f"{prefix}/{i}", out)
    return out


def run_module(module: str, args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """What `python -m <module> <args>` run in `cwd` does, in this process (a stabletrain tool: the interpreter
    start-up is not paid again). Returns the exit status and output."""
    out, err, status, saved = io.StringIO(), io.StringIO(), 0, (sys.argv, Path.cwd())
    try:
        sys.argv = [module, *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
        err.write("" if isinstance(e.code, int) or e.code is None else str(e.code))
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
    return subprocess.CompletedProcess([module, *args], status, out.getvalue(), err.getvalue())
