"""`python -m stabletrain.plan <overrides>`: size a run without hardware. The model is built on the meta device and
the planner prints its parameters and FLOPs, the memory per GPU of the configured layout, and the layouts that fit
`trainer.plan_world_size` GPUs of `trainer.plan_gpu_mem_gib`, fastest first, each with the command that runs it
(stabletrain.planner; docs/engine.md). `python train.py ... trainer.plan=true` does the same.

    python -m stabletrain.plan model=mhc_27b precision=bf16 engine=zero1 trainer.plan_world_size=128
"""

from __future__ import annotations

import sys

from stabletrain import StableTrainError
from stabletrain.cli import compose_config
from stabletrain.config import validate
from stabletrain.planner.report import print_plan


def main(argv: list[str] | None = None) -> None:
    overrides = [a for a in (sys.argv[1:] if argv is None else argv) if a != "trainer.plan=true"]
    try:
        cfg = compose_config([*overrides, "trainer.plan=true"])
        validate(cfg)
        print_plan(cfg, overrides)
    except StableTrainError as e:
        print(f"stabletrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)


if __name__ == "__main__":
    main()
