"""The layout planner: for a model, a sequence length, a global batch and a precision, which pipeline stages x
expert parallelism x ZeRO stage x activation checkpointing x micro-batch fit in a GPU's memory, and how fast each
would run by a roofline model.

Memory per GPU (the fullest pipeline stage), bytes per parameter of the stage (`w` = 2 in bf16, 4 in fp32, `D` =
data-parallel ranks of the stage):

    weights      w                          / D at ZeRO-3
    gradients    w, plus 4 (fp32 accumulation) in bf16     / D at ZeRO-2 (the fp32 part at ZeRO >= 1)
    optimizer    8 (Adam moments), plus 4 (fp32 master) in bf16      / D at ZeRO >= 1, and in bf16 at ZeRO-0
                 (DeepSpeed's bf16 optimizer partitions them)
    experts      under expert parallelism each rank holds 1/ep of the routed experts with their own fp32 master,
                 gradients and moments (w + w + 8, plus 4 + 4 in bf16), not partitioned further
    activations  per micro-batch and block, what autograd keeps, measured on our modules at full size
                 (stabletrain.planner.footprint): all of it (none), the matmul and attention outputs (selective),
                 or one residual stream per recomputed segment plus one segment recomputed at a time (block);
                 plus the head and loss on the last stage, whose backward briefly holds the logits' gradient
                 (the larger of the two transients counts). In a pipeline stage s holds min(P - s, m) micro-batches
                 in flight (1F1B), m = accumulation steps
    pipeline     2 streams per micro-batch in flight (DeepSpeed's received inputs and sent outputs)

A layout fits when the total stays under 90% of `trainer.plan_gpu_mem_gib` (the rest: allocator fragmentation,
communication buckets, temporaries of backward).

Step time (trainer.plan_hardware, no overlap of communication with compute assumed):

    compute      FLOPs per GPU / (peak x efficiency), x (m + P - 1) / m for the pipeline bubble; block
                 recomputation adds one forward of the blocks; selective re-reads and writes the dropped
                 activations at HBM bandwidth
    data parallel  ring all-reduce of the stage's replicated gradients (2 (D-1)/D x bytes; ZeRO-3 adds the weight
                 all-gathers), experts over their expert-data-parallel group
    experts      four all-to-alls per MoE layer and micro-batch (dispatch, combine; forward, backward)
    pipeline     the stream sent forward and its gradient back, (m + P - 1) times
    links        NVLink within a node of `gpus_per_node`, InfiniBand between nodes; data-parallel and expert groups
                 are contiguous ranks (DeepSpeed's topology), pipeline neighbours are D ranks apart

MFU = model FLOPs per step / (step time x GPUs x peak).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from deepspeed.runtime.utils import partition_balanced, partition_uniform

from stabletrain.config import Config
from stabletrain.models import count_params, meta_model, model_flops_per_token
from stabletrain.models.moe import MoE
from stabletrain.planner.footprint import BlockFootprint, block_footprint, head_footprint

GiB = 1024**3
HEADROOM = 0.9
AC_MODES = ("none", "selective", "block")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Layout:
    pipeline_stages: int
    expert_parallel: int
    zero_stage: int
    activation_checkpointing: str
    micro_batch_size: int
    segment: int = 1  # blocks per recomputed segment (block mode)


@dataclass
class Estimate:
    layout: Layout
    accum: int
    memory: dict[str, float] = field(default_factory=dict)  # bytes on the fullest GPU
    step_s: float = math.nan
    mfu: float = math.nan

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values()) / GiB


class ModelProfile:
    """What the planner needs from the model: parameters per layer (meta device) and activation bytes per token
    per block (fake tensors), measured once per block kind."""

    def __init__(self, cfg: Config):
        m = cfg.model
        if m.vocab_size is None:  # not yet taken from the tokenizer: its configured size
            m = dataclasses.replace(m, vocab_size=cfg.data.tokenizer.vocab_size)
        model = meta_model(m)
        self.cfg, self.model_cfg, self.seq_len, self.dtype = cfg, m, cfg.data.seq_len, str(cfg.precision.dtype)
        self.total_params, self.active_params = count_params(model), count_params(model, active=True)
        self.flops_per_token = model_flops_per_token(model, self.seq_len)
        self.head_flops_per_token = 6.0 * m.d_model * m.vocab_size
        self.blocks: list[tuple[int, int]] = []  # (replicated, routed-expert) parameters per block
        for block in model.blocks:
            routed = sum(p.numel() for p in block.mlp.experts.parameters()) if isinstance(block.mlp, MoE) else 0
            self.blocks.append((sum(p.numel() for p in block.parameters()) - routed, routed))
        self.embed = model.embed.weight.numel()
        head = sum(p.numel() for p in model.norm.parameters()) + sum(p.numel() for p in model.stream.parameters())
        self.head = head + (0 if m.tie_embeddings else model.head.weight.numel())
        self.moe_layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
        self._footprints: dict[bool, BlockFootprint] = {}
        self.head_bytes = head_footprint(m, self.seq_len, self.dtype)

    def footprint(self, block: int) -> BlockFootprint:
        moe = block in self.moe_layers
        if moe not in self._footprints:
            self._footprints[moe] = block_footprint(self.model_cfg, block, self.seq_len, self.dtype)
        return self._footprints[moe]


def stage_bounds(weights: list[int], stages: int, method: str) -> list[int]:
    """Layer-list boundaries of the pipeline stages (stage s holds entries parts[s]..parts[s+1]-1), computed as
    DeepSpeed's PipelineModule does from the entries' parameter counts ("parameters") or their number ("uniform").
    The pipeline engine and the planner both partition with it."""
    if stages == 1:
        return [0, len(weights)]
    parts = partition_uniform(len(weights), stages) if method == "uniform" else partition_balanced(weights, stages)
    return [int(p) for p in parts]


def stage_partition(profile: ModelProfile, stages: int, segment: int, method: str) -> list[tuple[range, bool, bool]]:
    """(blocks, has embedding, has head) per stage, partitioned as the pipeline engine does."""
    L = len(profile.blocks)
    segments = [range(s, min(s + segment, L)) for s in range(0, L, segment)]
    weights = [profile.embed] + [sum(sum(profile.blocks[b]) for b in seg) for seg in segments] + [profile.head]
    if profile.cfg.model.tie_embeddings:
        weights.append(profile.embed)  # the tied embedding's second use on the last stage (its own layer-list entry)
    if stages == 1:
        return [(range(L), True, True)]
    parts = stage_bounds(weights, stages, method)
    out = []
    for s in range(stages):
        first, end = int(parts[s]), int(parts[s + 1])
        segs = [segments[i - 1] for i in range(first, end) if 1 <= i <= len(segments)]
        blocks = range(segs[0].start, segs[-1].stop) if segs else range(0)
        out.append((blocks, first == 0, first <= len(segments) + 1 < end))  # entry S + 1 is the head
    return out


def stage_params(profile: ModelProfile, layout: Layout, blocks: range, first: bool, last: bool) -> tuple[int, float]:
    """(replicated parameters, this rank's routed-expert parameters) of one rank of a stage, before ZeRO
    partitions anything: what it materializes outside ZeRO-3."""
    P, ep = layout.pipeline_stages, layout.expert_parallel
    replicated = sum(profile.blocks[b][0] for b in blocks) + (profile.embed if first else 0)
    replicated += profile.head + (profile.embed if profile.cfg.model.tie_embeddings and P > 1 else 0) if last else 0
    routed = sum(profile.blocks[b][1] for b in blocks)
    return (replicated + routed, 0.0) if ep == 1 else (replicated, routed / ep)


def _stage_memory(
    profile: ModelProfile, layout: Layout, dp: int, accum: int, blocks: range, first: bool, last: bool, stage: int
) -> dict[str, float]:
    P, z = layout.pipeline_stages, layout.zero_stage
    bf16 = profile.dtype == "bf16"
    w = 2 if bf16 else 4
    replicated, routed = stage_params(profile, layout, blocks, first, last)
    opt_shards = dp if (z >= 1 or bf16) else 1
    mem = {
        "weights": replicated * w / (dp if z == 3 else 1),
        "gradients": replicated * w / (dp if z >= 2 else 1) + (replicated * 4 / (dp if z >= 1 else 1) if bf16 else 0),
        "optimizer": replicated * (8 + (4 if bf16 else 0)) / opt_shards,
        "experts": routed * (2 * w + 8 + (8 if bf16 else 0)),
    }
    tokens = layout.micro_batch_size * profile.seq_len
    in_flight = min(P - stage, accum) if P > 1 else 1
    fps = [profile.footprint(b) for b in blocks]
    mode = layout.activation_checkpointing
    if mode == "block":
        per_micro = sum(fp.stream for fp in fps[:: layout.segment])
        transient = max(
            (sum(f.saved for f in fps[i : i + layout.segment]) for i in range(0, len(fps), layout.segment)), default=0.0
        )
    else:
        per_micro, transient = sum(fp.selective if mode == "selective" else fp.saved for fp in fps), 0.0
    if last:  # the head's backward holds the fp32 logits' gradient and its cast: 4 + w bytes per vocabulary entry
        per_micro += profile.head_bytes
        transient = max(transient, (4 + w) * profile.model_cfg.vocab_size)
    mem["activations"] = tokens * (in_flight * per_micro + transient)
    stream = profile.footprint(0).stream if profile.blocks else 0.0
    mem["pipeline"] = 2 * in_flight * tokens * stream if P > 1 else 0.0
    return mem


def _link(span: int, hw) -> float:
    """Bytes/s of a group of `span` consecutive ranks: NVLink inside a node, InfiniBand across nodes."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def _step_time(profile: ModelProfile, layout: Layout, world: int, accum: int, stages) -> float:
    hw = profile.cfg.trainer.plan_hardware
    P, ep, z, mb = layout.pipeline_stages, layout.expert_parallel, layout.zero_stage, layout.micro_batch_size
    dp, T, w = world // P, profile.seq_len, (2 if profile.dtype == "bf16" else 4)
    tokens_per_replica = mb * T * accum
    flops = profile.flops_per_token * tokens_per_replica / P  # per GPU: a stage's share of its replica's work
    if layout.activation_checkpointing == "block":
        flops *= 1 + (profile.flops_per_token - profile.head_flops_per_token) / 3 / profile.flops_per_token
    t = flops / (hw.peak_tflops * 1e12 * hw.efficiency) * (accum + P - 1) / accum
    blocks, _, _ = max(stages, key=lambda s: len(s[0]))
    if layout.activation_checkpointing == "selective":
        dropped = sum(profile.footprint(b).saved - profile.footprint(b).selective for b in blocks)
        t += 2 * dropped * tokens_per_replica / (hw.hbm_gbps * 1e9)
    replicated = sum(profile.blocks[b][0] + (profile.blocks[b][1] if ep == 1 else 0) for b in blocks)
    if dp > 1:
        t += 2 * (dp - 1) / dp * replicated * w * (1.5 if z == 3 else 1.0) / _link(dp, hw)
        routed = sum(profile.blocks[b][1] for b in blocks) / ep if ep > 1 else 0
        if dp // ep > 1:
            t += 2 * (dp // ep - 1) / (dp // ep) * routed * 4 / _link(dp, hw)
    if ep > 1:
        moe_blocks = [b for b in blocks if b in profile.moe_layers]
        ffn = profile.cfg.model.ffn
        volume = 4 * mb * T * ffn.top_k * profile.cfg.model.d_model * w * (ep - 1) / ep
        t += accum * len(moe_blocks) * volume / _link(ep, hw)
    if P > 1:
        carry = mb * T * profile.footprint(0).stream
        t += 2 * (accum + P - 1) * carry / _link(dp + 1, hw)
    return t


def estimate(profile: ModelProfile, layout: Layout, world: int, global_batch: int) -> Estimate | None:
    """The estimate for one layout, or None when the batch does not divide."""
    dp = world // layout.pipeline_stages
    if global_batch % (layout.micro_batch_size * dp):
        return None
    accum = global_batch // (layout.micro_batch_size * dp)
    stages = stage_partition(
        profile, layout.pipeline_stages, layout.segment, str(profile.cfg.engine.pipeline_partition)
    )
    worst: dict[str, float] = {}
    for s, (blocks, first, last) in enumerate(stages):
        mem = _stage_memory(profile, layout, dp, accum, blocks, first, last, s)
        if sum(mem.values()) > sum(worst.values()):
            worst = mem
    step = _step_time(profile, layout, world, accum, stages)
    hw = profile.cfg.trainer.plan_hardware
    mfu = profile.flops_per_token * global_batch * profile.seq_len / (step * world * hw.peak_tflops * 1e12)
    return Estimate(layout, accum, worst, step, mfu)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(profile: ModelProfile, world: int) -> list[Layout]:
    cfg = profile.cfg
    L, bf16 = len(profile.blocks), profile.dtype == "bf16"
    n_routed = cfg.model.ffn.n_routed if profile.moe_layers else 1
    n = cfg.model.residual.streams
    out = []
    for P in (p for p in _divisors(world) if p <= L):
        dp = world // P
        for ep, z, mode, mb in itertools.product(_divisors(math.gcd(dp, n_routed)), range(4), AC_MODES, MICRO_BATCHES):
            if (P > 1 and z >= 2) or (ep > 1 and z == 3) or (P > 1 and bf16 and z == 0):
                continue
            segment = max(1, round(math.sqrt(n * math.ceil(L / P) / (n + 2)))) if mode == "block" and n > 1 else 1
            out.append(Layout(P, ep, z, mode, mb, segment))
    return out


def search(
    cfg: Config, world: int, gpu_mem_gib: float, global_batch: int, profile: ModelProfile | None = None
) -> tuple[list[Estimate], int]:
    """Feasible layouts, fastest first, and how many were considered."""
    profile = profile or ModelProfile(cfg)
    estimates = [
        e
        for e in (estimate(profile, lay, world, global_batch) for lay in candidate_layouts(profile, world))
        if e is not None
    ]
    feasible = [e for e in estimates if e.total_gib <= HEADROOM * gpu_mem_gib]
    feasible.sort(key=lambda e: (e.step_s, e.total_gib))
    return feasible, len(estimates)


def layout_overrides(layout: Layout) -> list[str]:
    """The command-line overrides that select a layout."""
    out = [
        f"engine=zero{layout.zero_stage}",
        f"engine.pipeline_stages={layout.pipeline_stages}",
        f"engine.expert_parallel={layout.expert_parallel}",
        f"engine.activation_checkpointing={layout.activation_checkpointing}",
        f"trainer.micro_batch_size={layout.micro_batch_size}",
    ]
    if layout.activation_checkpointing == "block":
        out.append(f"engine.activation_checkpointing_blocks={layout.segment}")
    return out
