"""Entry point: compose the Hydra config and train.

    python train.py model.n_layers=8 trainer.max_steps=500
    torchrun --nproc_per_node 2 train.py engine=zero2
    python train.py -m optim.lr=3e-4,1e-3          # a sweep, one job after another
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from stabletrain import REPO_ROOT
from stabletrain.config import check_overrides, register
from stabletrain.engine.distributed import agree_on_run_stamp, is_launched

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    from pathlib import Path

    from stabletrain.training.trainer import run

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    if is_launched() and any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        sys.exit("stabletrain: error: do not combine -m with torchrun (every rank would launch the sweep); "
                 "run the sweep with plain python and launch torchrun per job")
    error = check_overrides(sys.argv[1:], REPO_ROOT / "conf")
    if error:
        sys.exit(f"stabletrain: config error: {error}")
    try:
        agree_on_run_stamp()
        main()
    except KeyboardInterrupt:  # Ctrl-C while the config composes or the process group forms
        sys.exit("stabletrain: aborted by Ctrl-C before training started")
