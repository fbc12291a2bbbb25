"""Compose the Hydra config and train: `python train.py ...` (the repository's entry) or
`python -m stabletrain.cli.train ...`.

    python train.py model=mhc trainer.max_steps=500
    torchrun --nproc_per_node 2 train.py engine=zero2
    python train.py -m optim.lr=3e-4,1e-3          # a sweep, one job after another
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stabletrain import StableTrainError
from stabletrain.cli import CONFIG_DIR, setup
from stabletrain.config import check_overrides, to_container, to_object, validate
from stabletrain.config.frozen import freeze
from stabletrain.distributed import STOP_SIGNALS, agree_on_run_stamp, barrier, is_launched
from stabletrain.planner.report import print_plan
from stabletrain.training.startup import Startup
from stabletrain.training.trainer import Trainer


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train from a composed config. Exit statuses: 2 for a user error (one line on stderr; 28 for a full disk
    during a save, 74 for another failed checkpoint write), 128 + the signal's number after a signal-stopped run
    (130 SIGINT, 143 SIGTERM: schedulers requeue on it)."""
    trainer, startup = None, Startup(int(os.environ.get("RANK", 0)))
    try:
        typed = to_object(cfg)
        for warning in validate(typed):
            if startup.rank == 0:
                print(f"stabletrain: warning: {warning}", file=sys.stderr)
        if not typed.trainer.plan:
            startup.phase("config", f"model={typed.model.name} data={typed.data.name} engine={typed.engine.name}")
        if typed.trainer.plan:
            print_plan(typed)
            return float("nan")
        if typed.logging.group is None and HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            typed.logging.group = Path(HydraConfig.get().sweep.dir).name  # a sweep's runs form one W&B group
        freeze(typed)  # read-only from here on: derived values go to config.resolved
        trainer = Trainer(typed, run_dir, to_container(cfg), startup)
        try:
            val_loss = trainer.fit()
            if trainer.stop_signal:
                _ignore_further_stops()
        finally:
            trainer.close()
        if trainer.stop_signal:
            barrier()  # no rank exits (which makes torchrun signal the others) before every rank has closed
            sys.exit(128 + trainer.stop_signal)
        if trainer.is_main and trainer.step == trainer.resumed_step:  # resumed at its last step: nothing to train
            print(f"already finished at step {trainer.step}; run directory: {run_dir}")
        elif trainer.is_main:
            print(f"final val_loss {val_loss:.4f}; run directory: {run_dir}")
        return val_loss
    except StableTrainError as e:
        print(f"stabletrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        at = f" at step {trainer.step}" if trainer is not None else " before training started"
        print(f"stabletrain: aborted by Ctrl-C{at}; nothing was saved after the last checkpoint", file=sys.stderr)
        sys.exit(130)


def _ignore_further_stops() -> None:
    """The run stops because of a signal: a further SIGTERM or SIGUSR1 (torchrun sends SIGTERM to the ranks still
    closing as soon as one rank has exited) must not cut the shutdown short; Ctrl-C still aborts."""
    for s in STOP_SIGNALS:
        if s != signal.SIGINT:
            signal.signal(s, signal.SIG_IGN)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        # hydra/launcher=submitit_slurm with one task per GPU: the ranks come from SLURM's environment.
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    setup()
    if is_launched() and any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        sys.exit(
            "stabletrain: error: do not combine -m with torchrun (every rank would launch the sweep); "
            "run the sweep with plain python and launch torchrun per job"
        )
    error = check_overrides(sys.argv[1:], CONFIG_DIR)
    if error:
        sys.exit(f"stabletrain: config error: {error}")
    try:
        agree_on_run_stamp()
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C while the config composes or the process group forms
        sys.exit("stabletrain: aborted by Ctrl-C before training started")


if __name__ == "__main__":
    main()
