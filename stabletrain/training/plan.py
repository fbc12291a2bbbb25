"""`trainer.plan=true`: size a run without hardware. Builds the model on the meta device (no memory), then
prints total and active parameters, training FLOPs per token and a per-GPU memory estimate for the configured
ZeRO stage, precision, offload and world size.

Memory model (bytes per parameter, before sharding): weights 2 (bf16) or 4 (fp32); gradients the same; optimizer
12 (fp32 master weights when bf16 + Adam m and v) or 8 (fp32). ZeRO-1 shards the optimizer over the data-parallel
ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; expert parallelism keeps 1/ep of the routed experts
per rank; offload moves the optimizer (and with offload_param
the weights) to CPU memory. Activations, per sequence and block without recomputation, follow Korthikanti et al.
(2022) with a fused attention kernel: 34·T·d bytes in 16-bit (×2 in fp32), plus 4·(n-1)·T·d for the extra
residual streams of HC/mHC and expert activations scaled by (top_k + shared) / dense width; the fp32 logits add
8·T·V. It is an estimate: allocator fragmentation and communication buffers come on top.
"""

from __future__ import annotations

import os

from stabletrain.config import Config
from stabletrain.models import count_params, meta_model, model_flops_per_token
from stabletrain.models.moe import MoE

GiB = 1024**3


def plan(cfg: Config) -> dict:
    m, t, e = cfg.model, cfg.trainer, cfg.engine
    if m.vocab_size is None:
        m.vocab_size = cfg.data.tokenizer.vocab_size
    model = meta_model(m)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for mod in model.modules() if isinstance(mod, MoE) for p in mod.experts.parameters())
    held = total - routed * (1 - 1 / e.expert_parallel)  # expert parallelism: each rank holds 1/ep of the experts
    active = count_params(model, active=True)
    world = t.plan_world_size or int(os.environ.get("WORLD_SIZE", 1))
    bf16 = cfg.precision.dtype == "bf16"
    w_bytes, opt_bytes = (2, 12) if bf16 else (4, 8)
    shard = lambda stage: world if e.zero_stage >= stage else 1  # noqa: E731
    weights = held * w_bytes / shard(3) * (0 if e.offload_param != "none" else 1)
    grads = held * w_bytes / shard(2)
    optimizer = held * opt_bytes / shard(1) * (0 if e.offload_optimizer != "none" else 1)
    T, d, B = cfg.data.seq_len, m.d_model, t.micro_batch_size
    act_scale = 1 if bf16 else 2
    per_block = []
    for block in model.blocks:
        ffn_ratio = 1.0
        if isinstance(block.mlp, MoE):
            ffn_ratio = (m.ffn.top_k + m.ffn.n_shared) * m.ffn.expert_hidden / m.ffn_dim
        # 34·T·d: about 10 T·d for attention and norms, 24 T·d for the dense SwiGLU part (scaled for experts).
        per_block.append((10 + 24 * ffn_ratio) * T * d * act_scale + 4 * (m.residual.streams - 1) * T * d)
    activations = B * (sum(per_block) + 8 * T * m.vocab_size)
    return {
        "total_params": total,
        "active_params": active,
        "flops_per_token": model_flops_per_token(model, T),
        "world_size": world,
        "memory_gib": {
            "weights": weights / GiB,
            "gradients": grads / GiB,
            "optimizer": optimizer / GiB,
            "activations": activations / GiB,
            "total": (weights + grads + optimizer + activations) / GiB,
        },
    }


def print_plan(cfg: Config) -> dict:
    p = plan(cfg)
    e, mem = cfg.engine, p["memory_gib"]
    print(f"model={cfg.model.name}")
    print(f"total_params={p['total_params']}")
    print(f"active_params={p['active_params']}")
    print(f"flops_per_token={p['flops_per_token']:.4e}")
    offload = ", ".join(
        f"{k} offload to {v}"
        for k, v in (("optimizer", e.offload_optimizer), ("param", e.offload_param))
        if v != "none"
    )
    ep = f", expert parallel {e.expert_parallel}" if e.expert_parallel > 1 else ""
    print(
        f"memory per GPU (ZeRO-{e.zero_stage}{ep}, {cfg.precision.dtype}, {p['world_size']} GPU(s), micro batch "
        f"{cfg.trainer.micro_batch_size} x {cfg.data.seq_len} tokens{', ' + offload if offload else ''}): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items())
    )
    return p
