"""Run several training jobs one after another inside one torchrun launch (one process group), so that tests of
multi-rank layouts pay the process start-up and the DeepSpeed import once instead of once per configuration.

    torchrun --nproc_per_node 2 -m tests.dist_jobs JOBS.json     # [{"run_dir": ..., "overrides": [...]}, ...]

Each job runs as `train.py <overrides> hydra.run.dir=<run_dir>` would (stabletrain.cli.train.run); a job that
exits (a user error, a signal) writes its exit status to <run_dir>/exit_status and the next job starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from stabletrain.cli import CONFIG_DIR, setup
from stabletrain.cli.train import run
from stabletrain.distributed import rank


def main(jobs_file: str) -> None:
    setup()
    for job in json.loads(Path(jobs_file).read_text()):
        run_dir = Path(job["run_dir"])
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=job["overrides"])
        status = 0
        try:
            run(cfg, run_dir)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        if rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "exit_status").write_text(str(status))


if __name__ == "__main__":
    main(sys.argv[1])
