"""Materialize one rank of a large model under a large layout, in one process, on the CPU, without a process
group, as that rank would: meta build, its pipeline stage (rank_plan), parallelize (expert parallelism takes the
other experts out), materialize. Prints what it holds against the planner's count for that rank, and its peak RSS.

    python -m tests.scale_rank model=mhc_27b engine=zero1 engine.pipeline_stages=16 engine.expert_parallel=8 \\
        --data-parallel 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from stabletrain.config import RankLayout
from stabletrain.engine.build import engine_class
from stabletrain.models import meta_model
from stabletrain.parallel.materialize import materialize
from stabletrain.parallel.parallelize import parallelize
from stabletrain.planner.report import configured_layout
from stabletrain.planner.search import GiB, ModelProfile, stage_params, stage_partition
from stabletrain.training.perf import peak_memory_gib
from tests.helpers import composed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--data-parallel", type=int, default=1)
    args = parser.parse_args()
    cfg = composed(*args.overrides)
    P, cpu = cfg.engine.pipeline_stages, torch.device("cpu")
    profile, layout = ModelProfile(cfg), configured_layout(cfg)
    stages = stage_partition(profile, P, layout.segment, str(cfg.engine.pipeline_partition))
    planned = [sum(stage_params(profile, layout, *s)) for s in stages]
    stage = max(range(P), key=planned.__getitem__)  # the fullest stage
    rank = RankLayout(P * args.data_parallel, stage * args.data_parallel, P)
    t0 = time.perf_counter()
    model = meta_model(cfg.model)
    plan = engine_class(cfg).rank_plan(model, cfg, rank)
    parallel = parallelize(model, cfg, rank, plan.blocks, cpu)
    done = materialize(model, cpu, cfg.trainer.seed, plan.ownership, parallel.extra_modules())
    result = {"stage": stage, "blocks": [plan.blocks.start, plan.blocks.stop], "materialized": done.params,
              "bytes": done.bytes, "planned": planned[stage], "total": profile.total_params,
              "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_memory_gib(cpu), "GiB": GiB}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
