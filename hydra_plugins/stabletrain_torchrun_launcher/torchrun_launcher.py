"""`python train.py -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=N ...`: every job of a sweep runs as its
own torchrun process group, in its own run directory under the sweep directory, `parallel` jobs at a time (each on
its own port; on GPUs give each job its own devices with `devices_per_job`, taken in order from
CUDA_VISIBLE_DEVICES or 0..). A failed job is recorded (its exit status in <job dir>/exit_status, its
output in <job dir>/launcher.log) and the sweep goes on; its return value is NaN. The return value of a completed job is
its final validation loss, read from its metrics.jsonl (what train.py returns, e.g. to the Optuna sweeper).
"""

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from stabletrain.analysis.report import read_jsonl
from stabletrain.distributed import free_port

log = logging.getLogger(__name__)
REPO_TRAIN = Path(__file__).resolve().parents[2] / "train.py"


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.stabletrain_torchrun_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 1  # ranks of each job
    parallel: int = 1  # jobs running at once
    devices_per_job: Optional[int] = None  # GPUs: CUDA_VISIBLE_DEVICES slice per concurrent job (None: all)
    max_restarts: int = 0  # torchrun --max-restarts (elastic restarts of a job's group)
    script: Optional[str] = None  # the training script (default: this repository's train.py)


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="stabletrain")


def final_val_loss(run_dir: Path) -> float | None:
    vals = [r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]
    return float(vals[-1]) if vals else None


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int = 1, parallel: int = 1, devices_per_job: Optional[int] = None,
                 max_restarts: int = 0, script: Optional[str] = None) -> None:  # fmt: skip
        self.nproc, self.parallel, self.devices_per_job = nproc_per_node, max(1, parallel), devices_per_job
        self.max_restarts, self.script = max_restarts, script or str(REPO_TRAIN)
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job(self, idx: int, overrides: Sequence[str]):
        """(job config, run directory, command) of sweep job idx."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        hc = sweep_config.hydra
        run_dir = Path(str(hc.sweep.dir)) / str(hc.sweep.subdir)
        group = Path(str(hc.sweep.dir)).name
        args = [o for o in filter_overrides(overrides)]
        if not any(o.split("=", 1)[0].lstrip("+") == "logging.group" for o in args):
            args.append(f"logging.group={group}")  # the sweep's runs form one W&B group
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={self.nproc}",
               f"--max-restarts={self.max_restarts}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", self.script, *args,
               f"hydra.run.dir={run_dir.resolve()}"]  # fmt: skip
        return sweep_config, run_dir, cmd

    def _env(self, slot: int) -> dict:
        env = dict(os.environ)
        env.pop("STABLETRAIN_RUN_STAMP", None)  # each job its own stamp (its run directory is explicit anyway)
        if self.devices_per_job:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(self.devices_per_job * self.parallel)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                devices[slot * self.devices_per_job : (slot + 1) * self.devices_per_job]
            )
        return env

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            f"Launching {len(job_overrides)} jobs with torchrun ({self.nproc} rank(s) each, {self.parallel} at once)"
        )
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        running: dict[int, tuple] = {}  # slot -> (idx, overrides, config, run_dir, process, log file)
        results: dict[int, JobReturn] = {}
        while pending or running:
            for slot in range(self.parallel):
                if slot not in running and pending:
                    idx, overrides = pending.pop(0)
                    cfg, run_dir, cmd = self._job(idx, overrides)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "overrides.json").write_text(json.dumps(list(filter_overrides(overrides))))
                    out = open(run_dir / "launcher.log", "w")
                    log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} -> {run_dir}")
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(slot))
                    running[slot] = (idx, overrides, cfg, run_dir, proc, out)
            for slot, (idx, overrides, cfg, run_dir, proc, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                results[idx] = self._result(idx, overrides, cfg, run_dir, proc.returncode)
                del running[slot]
            time.sleep(0.2)
        return [results[i] for i in sorted(results)]

    def _result(self, idx, overrides, cfg, run_dir: Path, status: int) -> JobReturn:
        ret = JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=OmegaConf.create({"hydra": cfg.hydra}),
                        working_dir=str(run_dir), task_name=str(cfg.hydra.job.name))  # fmt: skip
        (run_dir / "exit_status").write_text(str(status))
        # A failed job returns NaN (an Optuna trial that failed), so that the sweep goes on to its other jobs.
        ret.status, ret.return_value = JobStatus.COMPLETED, final_val_loss(run_dir) if status == 0 else float("nan")
        if status != 0:
            log.warning(f"job #{idx} failed with exit status {status}; see {run_dir / 'launcher.log'}")
        return ret
