"""`trainer.plan=true`: size a run without hardware. Prints the model's parameters and FLOPs, the memory per GPU of
the configured layout, then searches every layout (pipeline stages x expert parallelism x ZeRO stage x activation
checkpointing x micro-batch) for `trainer.plan_world_size` GPUs of `trainer.plan_gpu_mem_gib` at the run's global
batch, and prints the ones that fit, fastest first, each with the command line that runs it. The memory and time
model is stabletrain.planner.search's (docs/engine.md).
"""

from __future__ import annotations

import shlex

from hydra.core.hydra_config import HydraConfig

from stabletrain.config import Config, checkpoint_segment, global_batch_size, launched_world_size
from stabletrain.planner.search import Estimate, GiB, Layout, ModelProfile, estimate, layout_overrides, search

SHOWN = 10  # layouts printed
# Overrides the printed layouts set themselves (or that only concern planning), dropped from the user's command.
OWN_KEYS = (
    "engine",
    "engine.zero_stage",
    "engine.pipeline_stages",
    "engine.expert_parallel",
    "engine.activation_checkpointing",
    "engine.activation_checkpointing_blocks",
    "trainer.micro_batch_size",
    "trainer.grad_accum_steps",
    "trainer.global_batch_size",
    "trainer.plan",
    "trainer.plan_world_size",
    "trainer.plan_gpu_mem_gib",
    "trainer.preflight",
)


def configured_layout(cfg: Config) -> Layout:
    e = cfg.engine
    return Layout(
        e.pipeline_stages,
        e.expert_parallel,
        e.zero_stage,
        str(e.activation_checkpointing),
        cfg.trainer.micro_batch_size,
        checkpoint_segment(cfg),
    )


def plan(cfg: Config) -> dict:
    """The configured layout's estimate and the feasible layouts for the planned world size."""
    world = launched_world_size(cfg)
    batch = global_batch_size(cfg, world)
    profile = ModelProfile(cfg)
    configured = estimate(profile, configured_layout(cfg), world, batch)
    feasible, considered = search(cfg, world, cfg.trainer.plan_gpu_mem_gib, batch, profile=profile)
    return {
        "total_params": profile.total_params,
        "active_params": profile.active_params,
        "flops_per_token": profile.flops_per_token,
        "world_size": world,
        "global_batch_size": batch,
        "configured": configured,
        "memory_gib": {k: v / GiB for k, v in configured.memory.items()} | {"total": configured.total_gib},
        "layouts": feasible,
        "considered": considered,
    }


def launch_command(overrides: list[str], est: Estimate, world: int, batch: int, gpus_per_node: int) -> str:
    """The torchrun line that runs a planned layout on `world` GPUs."""
    own = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in OWN_KEYS]
    nodes = max(1, world // gpus_per_node)
    per_node = world // nodes
    launcher = f"torchrun --nnodes {nodes} --nproc_per_node {per_node}" + (
        " --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500" if nodes > 1 else ""
    )
    args = [*own, *layout_overrides(est.layout), f"trainer.global_batch_size={batch}"]
    return f"{launcher} train.py {' '.join(shlex.quote(a) for a in args)}"


def user_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def describe(est: Estimate) -> str:
    lay = est.layout
    mem = " ".join(f"{k}={v / GiB:.1f}" for k, v in est.memory.items())
    seg = f" segment={lay.segment}" if lay.activation_checkpointing == "block" else ""
    return (
        f"layout: pp={lay.pipeline_stages} ep={lay.expert_parallel} zero={lay.zero_stage} "
        f"ac={lay.activation_checkpointing}{seg} micro={lay.micro_batch_size} accum={est.accum} "
        f"mem_per_gpu_gib={est.total_gib:.1f} ({mem}) step_s={est.step_s:.2f} mfu={est.mfu:.2f}"
    )


def print_plan(cfg: Config, overrides: list[str] | None = None) -> dict:
    p = plan(cfg)
    e, mem, world = cfg.engine, p["memory_gib"], p["world_size"]
    print(f"model={cfg.model.name}")
    print(f"total_params={p['total_params']}")
    print(f"active_params={p['active_params']}")
    print(f"flops_per_token={p['flops_per_token']:.4e}")
    offloads = (("optimizer", e.offload_optimizer), ("param", e.offload_param))
    offload = ", ".join(f"{k} offload to {v}" for k, v in offloads if v != "none")
    ep = f", expert parallel {e.expert_parallel}" if e.expert_parallel > 1 else ""
    pp = f", {e.pipeline_stages} pipeline stages" if e.pipeline_stages > 1 else ""
    print(
        f"memory per GPU (ZeRO-{e.zero_stage}{pp}{ep}, {cfg.precision.dtype}, {world} GPU(s), micro batch "
        f"{cfg.trainer.micro_batch_size} x {cfg.data.seq_len} tokens{', ' + offload if offload else ''}): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items())
    )
    budget = cfg.trainer.plan_gpu_mem_gib
    print(
        f"searched {p['considered']} layouts for {world} GPU(s) of {budget:g} GiB at global batch "
        f"{p['global_batch_size']} x {cfg.data.seq_len} tokens: {len(p['layouts'])} fit"
    )
    overrides = user_overrides() if overrides is None else overrides
    gpn = cfg.trainer.plan_hardware.gpus_per_node
    for est in p["layouts"][:SHOWN]:
        print(describe(est))
        print(f"  {launch_command(overrides, est, world, p['global_batch_size'], gpn)}")
    if not p["layouts"]:
        print("no layout fits: raise trainer.plan_world_size, shorten data.seq_len or enable engine.offload_optimizer")
    return p
