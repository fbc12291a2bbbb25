"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Composition merges the YAML files in `conf/` over these dataclasses, so a misspelt key, a wrong type or a value
outside a closed vocabulary fails at compose time naming the key. Every number declares its range beside its
default (stabletrain.config.fields); `validate()` checks those and the cross-field rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from stabletrain.config.choices import (
    ActivationCheckpointing,
    Backend,
    DataFormat,
    Device,
    DType,
    FP8Backend,
    FP8Recipe,
    Offload,
    PipelinePartition,
    Preflight,
    ResidualInit,
    Schedule,
    TokenDtype,
    TokenizerModel,
    UTF8Errors,
    WandbMode,
)
from stabletrain.config.fields import ConfigError, at_least, between, positive
from stabletrain.config.monitor import MonitorConfig
from stabletrain.config.source import SourceConfig, source_from_entry


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
    """Depth scaling of a block's pre-norm outputs (model/norm=<name>): this class is `none`; LayerNorm Scaling and
    any other rule come with their registered configs (stabletrain.models.blocks)."""

    kind: str = "none"  # the registered name: set by model/norm=<name>

    def scale(self, layer_index: int) -> float | None:
        """The factor on block `layer_index`'s (0-based) pre-norm outputs; None: none."""
        return None

    def out_proj_init(self) -> ResidualInit:
        """The output projections' init rule when model.residual_init is null."""
        return ResidualInit.scaled

    def check(self, model: "ModelConfig") -> None:
        """Cross-field rules (ConfigError naming the key); subclasses extend."""


@dataclass
class SignalConfig:
    """Output scaling of each sublayer (model/signal=<name>): this class is `none`; the experimental BSLO
    propagation scalar comes with its registered config (stabletrain.models.residual.base)."""

    kind: str = "none"  # the registered name: set by model/signal=<name>

    def check(self, model: "ModelConfig") -> None:
        """Cross-field rules (ConfigError naming the key); subclasses extend."""


@dataclass
class AttentionConfig:
    """Multi-head self-attention (model/attention=mha); grouped-query and latent attention, and any other kind,
    come with their registered configs (stabletrain.models.layers, stabletrain.models.mla)."""

    kind: str = "mha"  # the registered name: set by model/attention=<name>
    qk_norm: bool = False  # stabiliser: RMSNorm on each head's q and k before RoPE

    doc_mask = True  # takes a per-document attention mask (data.doc_mask)

    def kv_heads(self, model: "ModelConfig") -> int:
        return model.n_heads

    def head_dim(self, model: "ModelConfig") -> int:
        """The query/key dimension of a head (the attention FLOPs count it)."""
        return model.d_model // model.n_heads

    def rope_dim(self, model: "ModelConfig") -> int:
        """The rotary dimension of a head: the whole head."""
        return self.head_dim(model)

    def check(self, model: "ModelConfig") -> None:
        """Cross-field rules (ConfigError naming the key); subclasses extend."""
        if model.d_model % model.n_heads:
            raise ConfigError(f"model.d_model={model.d_model} is not divisible by model.n_heads={model.n_heads}")
        if self.rope_dim(model) % 2:
            raise ConfigError(f"model head dimension {self.rope_dim(model)} must be even for rotary embeddings")


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
    """A model preset (model=<name>: the sizes) composes the parts of a block, each its own config group of
    registered components: model/attention, model/residual (the residual stream), model/norm (depth scaling of the
    pre-norms), model/ffn (dense or mixture-of-experts, with model/ffn/router), model/signal (output scaling)."""

    name: str = "baseline"  # the option's name (logged, W&B tags)
    vocab_size: Optional[int] = at_least(2, None)  # None: taken from the tokenizer
    d_model: int = at_least(1, 256)  # hidden size C
    n_layers: int = at_least(1, 4)  # blocks L
    n_heads: int = at_least(1, 4)  # attention heads
    attention: Any = field(default_factory=AttentionConfig)  # model/attention=mha|gqa|mla
    logit_z_loss: float = at_least(0, 0.0)  # stabiliser: + coef * mean(logsumexp(logits)^2) in fp32 (PaLM 1e-4)
    rope_theta: float = positive(10000.0)  # rotary base frequency
    norm_eps: float = positive(1e-6)  # RMSNorm eps
    tie_embeddings: bool = False  # share the embedding and output-head weights
    init_std: float = positive(0.02)  # std of the normal init of every weight
    # scaled: output projections use init_std/sqrt(2·n_layers); plain: init_std everywhere;
    # null: plain with LayerNorm Scaling (its paper found scaled init worse with it), scaled otherwise
    residual_init: Optional[ResidualInit] = None
    residual: Any = field(default_factory=ResidualConfig)
    norm: Any = field(default_factory=NormConfig)  # model/norm=none|lns
    ffn: Any = field(default_factory=FFNConfig)
    signal: Any = field(default_factory=SignalConfig)  # model/signal=none|bslo (experimental)

    @property
    def kv_heads(self) -> int:
        return self.attention.kv_heads(self)

    @property
    def ffn_dim(self) -> int:
        """Width of the dense MLP blocks."""
        return self.ffn.dense_width(self.d_model)

    @property
    def out_proj_init(self) -> ResidualInit:
        if self.residual_init is not None:
            return ResidualInit(self.residual_init)
        return self.norm.out_proj_init()


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
class PrepareConfig:
    """`python -m stabletrain.cli.prepare`: pre-tokenization into memory-mapped shards."""

    workers: int = at_least(1, 2)  # worker processes
    shard_docs: int = at_least(1, 4096)  # documents per output shard (the unit of resume)
    dtype: TokenDtype = TokenDtype.auto  # auto: uint16 when the vocabulary fits, else uint32


@dataclass
class DataConfig:
    name: str = "shakespeare"  # the option's name (logged, W&B tags)
    format: DataFormat = DataFormat.text  # text: tokenize on first use (cached) | pretokenized: read data.path
    path: Optional[str] = None  # format=text: a glob of local files (data.source.train_files); pretokenized: the dir
    # The document source, a config group: data/source=hub|local|<a plugin's> (the data presets select one)
    source: Any = field(default_factory=SourceConfig)
    # A weighted mixture instead: name -> a source's fields, its kind included (a plain dict so that
    # `+data.sources.<name>={...}` works on the command line; a misspelt key fails in source_configs()).
    sources: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = at_least(2, 256)  # tokens per training sequence
    doc_mask: bool = False  # attention stays within documents (per-position document ids go to the model)
    utf8_errors: UTF8Errors = UTF8Errors.replace  # replace: invalid bytes become U+FFFD | strict: error naming the file
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def source_configs(self) -> Dict[str, SourceConfig]:
        """name -> source: the mixture's entries, or data.source as the only one (reading data.path, if set)."""
        if self.sources:
            return {name: source_from_entry(entry, f"data.sources.{name}") for name, entry in self.sources.items()}
        own = self.source
        if self.path and self.format == DataFormat.text:
            own = own.with_path(self.path)
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
    mode: WandbMode = WandbMode.auto  # W&B: auto (online with a key, offline without) | online | offline | disabled
    project: str = "stabletrain"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); null: your default
    run_name: Optional[str] = None  # W&B run name; null: the run directory's name
    group: Optional[str] = None  # W&B group; null: the sweep directory's name under -m
    tags: List[str] = field(default_factory=list)
    progress: bool = True  # console progress bar on rank 0
    workspace_url: Optional[str] = None  # the W&B dashboard (stabletrain.analysis.wandb_workspace): alerts link it


# Dense (no sparsity) datasheet peak TFLOP/s per GPU: (bf16, fp32 via TF32). The one table: the planner's default
# roofline below and the trainer's MFU (training/perf.py) both read it.
GPU_PEAK_TFLOPS = {"H200": (989.0, 494.5), "H100": (989.0, 494.5), "A100": (312.0, 156.0), "L40S": (362.0, 183.0)}


@dataclass
class HardwareConfig:
    """The planner's roofline of one GPU and its node (defaults: an H100 SXM node, datasheet numbers)."""

    peak_tflops: float = positive(GPU_PEAK_TFLOPS["H100"][0])  # dense bf16 matmul peak
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
