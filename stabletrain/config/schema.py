"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Composition merges the YAML files in `conf/` over these dataclasses, so a misspelt key, a wrong type or a value
outside a closed vocabulary fails at compose time naming the key. Every number declares its range beside its
default (stabletrain.config.fields); `validate()` checks those and the cross-field rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from stabletrain.config.choices import (
    ActivationCheckpointing,
    Attention,
    Backend,
    DataFormat,
    DepthScaling,
    Device,
    DType,
    FP8Backend,
    FP8Recipe,
    Offload,
    PipelinePartition,
    Preflight,
    ResidualInit,
    Schedule,
    SignalScaling,
    TokenDtype,
    TokenizerModel,
    UTF8Errors,
    WandbMode,
)
from stabletrain.config.fields import ConfigError, at_least, between, positive
from stabletrain.config.monitor import MonitorConfig


@dataclass
class ResidualConfig:
    """What every residual stream has; a stream's own options come with its registered config, a subclass of this
    one (stabletrain/models/residual/, selected with model/residual=<name>). This class is the standard residual."""

    kind: str = "standard"  # the registered name: set by model/residual=<name>, not by hand
    streams: int = at_least(1, 1)  # expansion rate n (1 for the standard residual)
    out_init_mult: float = positive(1.0)  # multiplies the init std of attention/MLP output projections

    def check(self, model: "ModelConfig") -> None:
        """Cross-field rules of this stream (ConfigError naming the key); subclasses extend."""
        if self.kind == "standard" and self.streams != 1:
            raise ConfigError(
                f"model.residual.streams={self.streams} needs a multi-stream residual (model/residual=hc or mhc)"
            )


@dataclass
class NormConfig:
    depth_scaling: DepthScaling = DepthScaling.none  # lns: block l's pre-norm output times 1/sqrt(l)


@dataclass
class BSLOConfig:
    """Propagation scalar alpha_l = E|h_in| / (E|h_in + F| + eps), an EMA measured without gradient (experimental)."""

    momentum: float = between(0, 1, 0.99, hi_open=True)  # EMA momentum of the norms
    eps: float = positive(1e-6)
    clamp_min: float = positive(0.1)  # alpha's lower clamp
    clamp_max: float = positive(10.0)  # alpha's upper clamp
    warmup_steps: int = at_least(0, 50)  # alpha = 1 until this many training forwards


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank compressed Q and KV, decoupled RoPE key."""

    q_lora_rank: int = at_least(0, 0)  # 0: queries projected directly from x (no compression)
    kv_lora_rank: int = at_least(1, 64)  # rank of the compressed key/value latent
    qk_nope_head_dim: int = at_least(1, 32)  # per-head query/key dimension without RoPE
    qk_rope_head_dim: int = at_least(2, 16)  # decoupled rotary key/query dimension (shared key)
    v_head_dim: int = at_least(1, 32)  # per-head value dimension


@dataclass
class FFNConfig:
    """The feed-forward of every block: a dense SwiGLU MLP. Mixture-of-experts (model/ffn=moe) extends this
    config; its leading dense blocks use these fields."""

    kind: str = "dense"  # the registered name: set by model/ffn=<name>
    hidden: Optional[int] = at_least(1, None)  # SwiGLU width; None: 8/3·d_model rounded up to multiple_of
    multiple_of: int = at_least(1, 64)  # the default width is rounded up to this

    def dense_width(self, d_model: int) -> int:
        if self.hidden:
            return self.hidden
        m = self.multiple_of
        return ((8 * d_model // 3 + m - 1) // m) * m

    def check(self, model: "ModelConfig") -> None:
        """Cross-field rules of this feed-forward (ConfigError naming the key); subclasses extend."""


@dataclass
class ModelConfig:
    """A model preset (model=<name>: the sizes) composes the concerns below, each its own config group:
    model/residual (the residual stream), model/norm (depth scaling of the pre-norms), model/ffn (dense or
    mixture-of-experts, with model/ffn/router)."""

    name: str = "baseline"  # the option's name (logged, W&B tags)
    vocab_size: Optional[int] = at_least(2, None)  # None: taken from the tokenizer
    d_model: int = at_least(1, 256)  # hidden size C
    n_layers: int = at_least(1, 4)  # blocks L
    n_heads: int = at_least(1, 4)  # attention heads
    n_kv_heads: Optional[int] = at_least(1, None)  # None: equal to n_heads (multi-head attention)
    attention: Attention = Attention.mha
    qk_norm: bool = False  # stabiliser: RMSNorm on each head's q and k before RoPE (mha/gqa)
    logit_z_loss: float = at_least(0, 0.0)  # stabiliser: + coef * mean(logsumexp(logits)^2) in fp32 (PaLM 1e-4)
    mla: MLAConfig = field(default_factory=MLAConfig)
    rope_theta: float = positive(10000.0)  # rotary base frequency
    norm_eps: float = positive(1e-6)  # RMSNorm eps
    tie_embeddings: bool = False  # share the embedding and output-head weights
    init_std: float = positive(0.02)  # std of the normal init of every weight
    # scaled: output projections use init_std/sqrt(2·n_layers); plain: init_std everywhere;
    # null: plain with LayerNorm Scaling (its paper found scaled init worse with it), scaled otherwise
    residual_init: Optional[ResidualInit] = None
    residual: Any = field(default_factory=ResidualConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    ffn: Any = field(default_factory=FFNConfig)
    signal_scaling: SignalScaling = SignalScaling.none  # bslo: the experimental propagation scalar
    bslo: BSLOConfig = field(default_factory=BSLOConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.attention == "mha" or self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """Width of the dense MLP blocks."""
        return self.ffn.dense_width(self.d_model)

    @property
    def out_proj_init(self) -> ResidualInit:
        if self.residual_init is not None:
            return ResidualInit(self.residual_init)
        return ResidualInit.plain if self.norm.depth_scaling == DepthScaling.lns else ResidualInit.scaled


@dataclass
class TokenizerConfig:
    # A sentencepiece .model file or a Hugging Face tokenizer directory (tokenizer.json). A missing .model is
    # trained on first use from train_docs documents sampled from the training source(s); None: such a model
    # cached per source under data/<data.name>/tokenizer/ (and, with data.format=pretokenized, the prepared
    # directory's own tokenizer).
    path: Optional[str] = None
    vocab_size: int = at_least(8, 4096)
    model_type: TokenizerModel = TokenizerModel.bpe  # sentencepiece algorithm
    train_docs: int = at_least(1, 20000)  # documents sampled (shuffle buffer over the stream) to train a new one


@dataclass
class SourceConfig:
    """One document source: a Hugging Face hub dataset streamed with `datasets`, or local files.

    A single-source data config sets these fields on `data` itself; a mixture sets them per entry of `data.sources`.
    """

    kind: Optional[str] = None  # a registered data source (hub, local); null: hub when hf_id is set, else local
    hf_id: Optional[str] = None  # hub dataset id, e.g. allenai/c4; None: local files (train_files)
    subset: Optional[str] = None  # hub config name, e.g. en
    data_files: List[str] = field(default_factory=list)  # hub: json files inside the repo (no loading script)
    split: str = "train"  # hub split for training
    val_split: Optional[str] = None  # hub split held out for validation; None: see val_files / val_docs
    train_files: List[str] = field(default_factory=list)  # jsonl, parquet or plain-text files or globs
    val_files: List[str] = field(default_factory=list)  # empty (and no val_split): hold out val_docs documents
    val_docs: int = at_least(0, 200)  # held out from the start of the training stream when there is no val split
    text_field: str = "text"  # the field holding the text (jsonl, parquet, hub)
    max_docs: Optional[int] = at_least(1, None)  # at most N training documents from each input shard
    weight: float = positive(1.0)  # mixture weight (normalised over data.sources)

    @property
    def source_kind(self) -> str:
        return self.kind or ("hub" if self.hf_id else "local")


@dataclass
class PrepareConfig:
    """`python -m stabletrain.cli.prepare`: pre-tokenization into memory-mapped shards."""

    workers: int = at_least(1, 2)  # worker processes
    shard_docs: int = at_least(1, 4096)  # documents per output shard (the unit of resume)
    dtype: TokenDtype = TokenDtype.auto  # auto: uint16 when the vocabulary fits, else uint32


@dataclass
class DataConfig(SourceConfig):
    name: str = "shakespeare"  # the option's name (logged, W&B tags)
    format: DataFormat = DataFormat.text  # text: tokenize on first use (cached) | pretokenized: read data.path
    path: Optional[str] = None  # format=text: a glob of local files (replaces train_files); pretokenized: the dir
    # A weighted mixture: name -> SourceConfig fields (a plain dict so that `+data.sources.<name>={...}` works on the
    # command line; unknown keys fail in source_configs()). Empty: the single source set on `data` itself.
    sources: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = at_least(2, 256)  # tokens per training sequence
    doc_mask: bool = False  # attention stays within documents (per-position document ids go to the model)
    utf8_errors: UTF8Errors = UTF8Errors.replace  # replace: invalid bytes become U+FFFD | strict: error naming the file
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def source_configs(self) -> Dict[str, SourceConfig]:
        """name -> source: the mixture's entries, or this config as its only source."""
        if self.sources:
            known, out = {f.name for f in fields(SourceConfig)}, {}
            for name, entry in self.sources.items():
                entry = dict(entry) if not isinstance(entry, SourceConfig) else entry.__dict__
                unknown = sorted(set(entry) - known)
                if unknown:
                    raise ConfigError(
                        f"data.sources.{name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                    )
                for key in ("train_files", "val_files", "data_files"):  # a single path is a list of one
                    if isinstance(entry.get(key), str):
                        entry[key] = [entry[key]]
                out[name] = SourceConfig(**entry)
            return out
        own = SourceConfig(**{f.name: getattr(self, f.name) for f in fields(SourceConfig)})
        if self.path and self.format == DataFormat.text:
            own.train_files = [self.path]
        return {self.name: own}


@dataclass
class EngineConfig:
    name: str = "zero0"  # the option's name (logged, W&B tags)
    zero_stage: int = between(0, 3, 0)
    offload_optimizer: Offload = Offload.none  # ZeRO-Offload of the optimizer states to CPU memory (ZeRO >= 1)
    offload_param: Offload = Offload.none  # ZeRO-3 only
    backend: Backend = Backend.auto  # auto: nccl with CUDA, gloo otherwise
    expert_parallel: int = at_least(1, 1)  # ranks per expert-parallel group (experts sharded, all-to-all dispatch)
    pipeline_stages: int = at_least(1, 1)  # pipeline stages (DeepSpeed PipelineModule); ranks / stages = data parallel
    pipeline_partition: PipelinePartition = PipelinePartition.parameters  # how layers are split into stages
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none  # recompute in backward
    # block mode: consecutive blocks recomputed as one segment, of which only the input stream is kept; 0: the mHC
    # paper's optimum sqrt(n L / (n + 2)) for n residual streams and L blocks (per pipeline stage)
    activation_checkpointing_blocks: int = at_least(0, 1)
    ds_config: Dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON


@dataclass
class FP8Config:
    """DeepSeek-V3-style FP8 GEMMs for the Linears of the blocks (docs/fp8.md)."""

    enabled: bool = False  # run every block Linear's three GEMMs with E4M3 operands (precision=fp8 sets it)
    backend: FP8Backend = FP8Backend.emulate
    recipe: FP8Recipe = FP8Recipe.blockwise
    pow2_scales: bool = False  # round each scale up to a power of two (exact rescaling; DeepSeek-V3 for some)
    dispatch: bool = False  # expert parallelism sends tokens to their experts in FP8 (combine stays high precision)
    min_coverage: float = between(0, 1, 1.0)  # refuse a run whose block Linears' weights run in FP8 less than this


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # the option's name (logged, W&B tags)
    dtype: DType = DType.fp32  # weights and activations outside the FP8 GEMMs; fp32 master weights always
    fp8: FP8Config = field(default_factory=lambda: FP8Config())


@dataclass
class OptimConfig:
    name: str = "adamw"  # the option's name (logged, W&B tags)
    lr: float = positive(1e-3)  # peak learning rate
    betas: List[float] = between(0, 1, [0.9, 0.95], hi_open=True, length=2)  # AdamW (beta1, beta2)
    eps: float = positive(1e-8)
    weight_decay: float = at_least(0, 0.1)  # AdamW weight decay (not on vectors or flagged coefficients)
    grad_clip: float = at_least(0, 1.0)  # 0 disables clipping
    grad_clip_warmup_steps: int = at_least(0, 0)  # stabiliser: the clip threshold ramps from
    grad_clip_warmup_start: float = between(0, 1, 0.1, lo_open=True)  # start x grad_clip over those steps (0: off)
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = at_least(0, 20)
    total_steps: Optional[int] = at_least(1, None)  # schedule horizon; None: trainer.max_steps
    min_lr_ratio: float = between(0, 1, 0.1)  # final lr as a fraction of lr (cosine and wsd)
    decay_fraction: float = between(0, 1, 0.2)  # wsd: fraction of total_steps spent decaying
    step_milestones: List[float] = between(0, 1, [0.8, 0.9], lo_open=True)  # step: increasing fractions of total_steps
    step_factors: List[float] = positive([0.316, 0.1])  # step: lr factor after each milestone


@dataclass
class LoggingConfig:
    name: str = "wandb"  # the option's name (logged, W&B tags)
    wandb: bool = True  # log to W&B (the wandb callback)
    mode: WandbMode = WandbMode.auto  # auto: online with an API key, offline without
    project: str = "stabletrain"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); null: your default
    run_name: Optional[str] = None  # W&B run name; null: the run directory's name
    group: Optional[str] = None  # W&B group; null: the sweep directory's name under -m
    tags: List[str] = field(default_factory=list)
    progress: bool = True  # console progress bar on rank 0
    workspace_url: Optional[str] = None  # the W&B dashboard (stabletrain.analysis.wandb_workspace): alerts link it


@dataclass
class HardwareConfig:
    """The planner's roofline of one GPU and its node (defaults: an H100 SXM node, datasheet numbers)."""

    peak_tflops: float = positive(989.0)  # dense bf16 matmul peak
    hbm_gbps: float = positive(3350.0)  # memory bandwidth
    intra_node_gbps: float = positive(450.0)  # per GPU, one direction (NVLink 4)
    inter_node_gbps: float = positive(50.0)  # per GPU, one direction (400 Gb/s InfiniBand per GPU)
    gpus_per_node: int = at_least(1, 8)
    efficiency: float = between(0, 1, 0.6, lo_open=True)  # sustained fraction of peak for large matmuls


DEFAULT_CALLBACKS = ["console", "metrics", "wandb", "gains", "fp8", "moe_balance", "signal_sync", "forensics"]


@dataclass
class TrainerConfig:
    max_steps: int = at_least(1, 200)  # optimizer steps of the run
    stop_at: Optional[int] = at_least(1, None)  # stop (with a checkpoint) at this step, as an interruption would
    micro_batch_size: int = at_least(1, 8)  # sequences per rank per micro-batch
    # sequences per optimizer step over all ranks; gradient accumulation = global / (micro x data-parallel ranks)
    global_batch_size: Optional[int] = at_least(1, None)
    grad_accum_steps: Optional[int] = at_least(1, None)  # instead of global_batch_size; null: derived (or 1)
    eval_interval: int = at_least(0, 50)  # 0: evaluate only at the end
    eval_batches: int = at_least(1, 4)  # validation batches per evaluation
    ckpt_interval: int = at_least(0, 100)  # 0: only at the end
    keep_checkpoints: int = at_least(0, 2)  # 0: keep all
    ckpt_async: bool = False  # the step waits only for a copy to host memory; a background thread writes the files
    skip_batches: List[List[int]] = at_least(0, [])  # [start, end) ranges of global batch indices to skip
    log_interval: int = at_least(1, 1)  # log metrics every N steps
    seed: int = between(0, 2**32 - 1, 1234)  # weights and data order
    resume: str = "none"  # none | auto | a checkpoint directory (step_*) or a directory of them
    accept_legacy_checkpoints: bool = False  # resume from manifests without digests (unchecked), with a warning
    peak_tflops: Optional[float] = positive(None)  # for MFU; None: known GPU table, or a measured CPU matmul peak
    device: Device = Device.auto
    # torch.compile each transformer block (torchtitan-style): true | false | auto (on CUDA devices, off on a CPU);
    # the first steps pay the compile (perf/compile_s)
    compile: Any = field(default="auto", metadata={"shown_type": "true | false | auto"})
    preflight: Preflight = Preflight.error  # does the layout fit this rank's memory? error | warn | off
    plan: bool = False  # print parameters, FLOPs and per-GPU memory for the configured run, then exit
    plan_world_size: Optional[int] = at_least(1, None)  # plan for this many GPUs (None: WORLD_SIZE or 1)
    plan_gpu_mem_gib: float = positive(80.0)  # memory per GPU a planned layout must fit in
    plan_hardware: HardwareConfig = field(default_factory=lambda: HardwareConfig())  # the planner's roofline
    # Registered callbacks, in order; each applies only where it makes sense (moe_balance: MoE layers, ...).
    callbacks: List[str] = field(default_factory=lambda: list(DEFAULT_CALLBACKS))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
