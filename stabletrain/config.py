"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Composition merges the YAML files in `conf/` over these dataclasses, so a misspelt key or a wrong type fails
at compose time naming the key. `validate()` adds the cross-field checks a type system cannot express.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stabletrain import REPO_ROOT, StableTrainError


class ConfigError(StableTrainError):
    pass


@dataclass
class ResidualConfig:
    """The residual-stream policy (methods.md §1-2): standard, Hyper-Connections (hc) or manifold-constrained (mhc)."""

    kind: str = "standard"  # standard | hc | mhc
    streams: int = 1  # expansion rate n (hc/mhc)
    dynamic: bool = True  # hc: input-dependent coefficients on top of the static ones
    tanh: bool = True  # hc: tanh on the dynamic coefficients
    gate_init: float = 0.01  # hc: s_alpha = s_beta init; mhc: alpha_pre/post/res init
    out_init_mult: float = 1.0  # multiplies the init std of attention/MLP output projections (HC's sqrt(n) knob)
    sinkhorn_iters: int = 20  # mhc
    init: str = "hc"  # mhc bias init: hc (b_res = tau*I, soft one-hot b_pre) | megatron (all biases 0)
    phi_init: str = "normal"  # mhc: normal (std phi_std) | xavier
    phi_std: float = 0.02
    res_logit: float = 4.0  # mhc init=hc: tau on the diagonal of b_res
    pre_logit: float = 4.0  # mhc init=hc: +/- this on b_pre (soft one-hot on stream k mod n)
    norm_eps: float = 1e-20  # mhc: eps of the RMS over the flattened n*C vector (paper: 1e-20)
    collapse: str = "sum"  # mhc output collapse: sum | head (learned pre-only head)
    kernel: str = "eager"  # mhc: eager (PyTorch reference) | fused (torch.compile'd read/write: C++ on CPU, Triton on GPU)


@dataclass
class NormConfig:
    depth_scaling: str = "none"  # none | lns: block l's pre-norm output times 1/sqrt(l) (methods.md §3)


@dataclass
class BSLOConfig:
    """Propagation scalar alpha_l = E|h_in| / (E|h_in + F| + eps), an EMA measured without gradient (experimental)."""

    momentum: float = 0.99
    eps: float = 1e-6
    clamp_min: float = 0.1
    clamp_max: float = 10.0
    warmup_steps: int = 50  # alpha = 1 until this many training forwards


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank compressed Q and KV, decoupled RoPE key."""

    q_lora_rank: int = 0  # 0: queries projected directly from x (no compression)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32


@dataclass
class MoEConfig:
    """Fine-grained routed experts plus shared experts (DeepSeekMoE), methods.md §4 and §6."""

    n_routed: int = 8
    n_shared: int = 1
    top_k: int = 2
    expert_hidden: int = 128  # SwiGLU width of one routed (and one shared) expert
    first_dense: int = 1  # the first k blocks keep a dense MLP
    router: str = "aux_free"  # none | softmax_aux | aux_free | bslo
    aux_loss_coef: float = 0.01  # softmax_aux: Switch/GShard load-balancing loss
    bias_update_rate: float = 1e-3  # aux_free: u in b_i += u * sign(mean load - load_i)
    seq_aux_coef: float = 0.0  # aux_free: complementary sequence-wise balance loss (DeepSeek-V3: 1e-4)
    route_scale: float = 1.0  # aux_free: gates multiplied after normalisation (DeepSeek-V3: 2.5)
    n_groups: int = 1  # aux_free: group-limited routing over n_groups expert groups
    topk_groups: int = 1  # ... of which each token may use this many
    z_loss_coef: float = 0.0  # router z-loss, any router
    capacity_factor: float = 1.25  # bslo: C = capacity_factor * tokens * top_k / n_routed
    temperature: float = 1.0  # bslo: softmax temperature tau


@dataclass
class ModelConfig:
    name: str = "baseline"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: equal to n_heads (multi-head attention)
    attention: str = "mha"  # mha | gqa | mla
    qk_norm: bool = False  # stabiliser: RMSNorm on each head's q and k before RoPE (mha/gqa)
    logit_z_loss: float = 0.0  # stabiliser: + coef * mean(logsumexp(logits)^2) in fp32 (PaLM 1e-4)
    mla: MLAConfig = field(default_factory=MLAConfig)
    ffn: str = "dense"  # dense | moe
    moe: MoEConfig = field(default_factory=MoEConfig)
    ffn_hidden: Optional[int] = None  # None: 8/3·d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    residual_init: str = "scaled"  # scaled: output projections use init_std/sqrt(2·n_layers); plain: init_std
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    signal_scaling: str = "none"  # none | bslo
    bslo: BSLOConfig = field(default_factory=BSLOConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.attention == "mha" or self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return ((8 * self.d_model // 3 + m - 1) // m) * m


@dataclass
class TokenizerConfig:
    # A sentencepiece .model file or a Hugging Face tokenizer directory (tokenizer.json). A missing .model is
    # trained on first use from train_docs documents sampled from the training source(s); None: such a model
    # cached per source under data/<data.name>/tokenizer/.
    path: Optional[str] = None
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram
    train_docs: int = 20000  # documents sampled (shuffle buffer over the stream) to train a new tokenizer


@dataclass
class SourceConfig:
    """One document source: a Hugging Face hub dataset streamed with `datasets`, or local files.

    A single-source data config sets these fields on `data` itself; a mixture sets them per entry of `data.sources`.
    """

    hf_id: Optional[str] = None  # hub dataset id, e.g. allenai/c4; None: local files (train_files)
    subset: Optional[str] = None  # hub config name, e.g. en
    data_files: List[str] = field(default_factory=list)  # hub: json files inside the repo (no loading script)
    split: str = "train"
    val_split: Optional[str] = None  # hub split held out for validation; None: see val_files / val_docs
    train_files: List[str] = field(default_factory=list)  # jsonl, parquet or plain-text files or globs
    val_files: List[str] = field(default_factory=list)  # empty (and no val_split): hold out val_docs documents
    val_docs: int = 200  # held out from the start of the training stream when there is no validation split
    text_field: str = "text"
    max_docs: Optional[int] = None  # at most N training documents from each input shard (quick runs on huge corpora)
    weight: float = 1.0  # mixture weight (normalised over data.sources)


@dataclass
class PrepareConfig:
    """`python -m stabletrain.data.prepare`: pre-tokenization into memory-mapped shards."""

    workers: int = 2  # worker processes
    shard_docs: int = 4096  # documents per output shard (the unit of resume)
    dtype: str = "auto"  # auto: uint16 when the vocabulary fits, else uint32 | uint16 | uint32


@dataclass
class DataConfig(SourceConfig):
    name: str = "shakespeare"
    format: str = "text"  # text: tokenize on first use (cached) | pretokenized: read data.path from `prepare`
    path: Optional[str] = None  # format=text: a glob of local files (replaces train_files); pretokenized: the directory
    # A weighted mixture: name -> SourceConfig fields (a plain dict so that `+data.sources.<name>={...}` works on the
    # command line; unknown keys fail in source_configs()). Empty: the single source set on `data` itself.
    sources: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    doc_mask: bool = False  # attention stays within documents (per-position document ids go to the model)
    utf8_errors: str = "replace"  # replace: invalid bytes become U+FFFD (counted) | strict: error naming the file
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
                    raise ConfigError(f"data.sources.{name}: unknown key(s) {', '.join(unknown)} (known: "
                                      f"{', '.join(sorted(known))})")
                for key in ("train_files", "val_files", "data_files"):  # a single path is a list of one
                    if isinstance(entry.get(key), str):
                        entry[key] = [entry[key]]
                out[name] = SourceConfig(**entry)
            return out
        own = SourceConfig(**{f.name: getattr(self, f.name) for f in fields(SourceConfig)})
        if self.path and self.format == "text":
            own.train_files = [self.path]
        return {self.name: own}


@dataclass
class EngineConfig:
    name: str = "zero0"
    zero_stage: int = 0
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (ZeRO-3 only)
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    expert_parallel: int = 1  # ranks per expert-parallel group (MoE experts sharded, all-to-all dispatch)
    ds_config: Dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    dtype: str = "fp32"  # fp32 | bf16


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    grad_clip_warmup_steps: int = 0  # stabiliser: the clip threshold ramps from grad_clip_warmup_start x grad_clip
    grad_clip_warmup_start: float = 0.1  # to grad_clip over this many steps (0: off)
    schedule: str = "cosine"  # cosine | wsd | constant | step
    warmup_steps: int = 20
    total_steps: Optional[int] = None  # schedule horizon; None: trainer.max_steps
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: fraction of total_steps spent decaying
    step_milestones: List[float] = field(default_factory=lambda: [0.8, 0.9])  # step: fractions of total_steps
    step_factors: List[float] = field(default_factory=lambda: [0.316, 0.1])  # step: lr factor after each milestone


@dataclass
class LoggingConfig:
    name: str = "wandb"
    wandb: bool = True
    mode: str = "auto"  # auto: online with an API key, offline without | online | offline
    project: str = "stabletrain"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    progress: bool = True  # console progress bar on rank 0


@dataclass
class TrainerConfig:
    max_steps: int = 200
    stop_at: Optional[int] = None  # stop (with a checkpoint) at this step, as an interruption would
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    eval_interval: int = 50  # 0: evaluate only at the end
    eval_batches: int = 4
    ckpt_interval: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    skip_batches: List[List[int]] = field(default_factory=list)  # [start, end) ranges of global batch indices to skip
    log_interval: int = 1
    seed: int = 1234
    resume: str = "none"  # none | auto | <checkpoints dir of another run>
    peak_tflops: Optional[float] = None  # for MFU; None: known GPU table, or a measured CPU matmul peak
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer block (torchtitan-style); the first steps pay the compile
    plan: bool = False  # print parameters, FLOPs and per-GPU memory for the configured run, then exit
    plan_world_size: Optional[int] = None  # plan for this many GPUs (None: WORLD_SIZE or 1)


@dataclass
class DetectorConfig:
    """One rolling detector over a per-step scalar (methods.md §7): fires when the value exceeds
    mean + sigma * std of the last `window` accepted values (and min_ratio times their mean), or max_ratio
    times their maximum."""

    enabled: bool = True
    window: int = 128
    sigma: float = 6.0  # 0: z-score rule off
    min_ratio: float = 1.0  # the z-score rule also needs value >= min_ratio x window mean (noisy small-batch norms)
    max_ratio: float = 0.0  # the "k x recent maximum" rule; 0: off
    response: Optional[str] = None  # log | skip_step | rollback | stop; null: monitor.response


@dataclass
class NonfiniteConfig:
    response: str = "skip_step"  # skip_step | rollback | stop (a NaN/Inf never reaches the weights)


@dataclass
class InjectConfig:
    """Testing aid: perturb one step on purpose to exercise detection and the responses."""

    step: Optional[int] = None  # the step to perturb (1-based, as logged); null: off
    kind: str = "loss"  # loss: multiply the loss by `scale` | nan: make it NaN | poison: a batch of one repeated token
    scale: float = 50.0


@dataclass
class MonitorConfig:
    name: str = "default"
    gain_interval: int = 25  # signal-gain diagnostics every N steps (gain/* metrics); 0: off
    response: str = "skip_step"  # default response to a spike: log | skip_step | rollback | stop
    warmup_steps: int = 64  # detectors fire only after this many accepted steps (OLMo-core: max(20, 64))
    loss: DetectorConfig = field(default_factory=DetectorConfig)
    grad_norm: DetectorConfig = field(default_factory=lambda: DetectorConfig(min_ratio=3.0, max_ratio=10.0))
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    rollback_skip_batches: int = 4  # batches of the data stream skipped after a rollback, ending with the spike's
    max_rollbacks: int = 3  # more rollbacks than this within rollback_window steps: stop instead
    rollback_window: int = 1000
    forensics: bool = True  # write <run_dir>/spikes/<step>/ on every spike and non-finite step
    alert_interval_s: float = 300.0  # at most one W&B alert of a kind per this many seconds
    inject: InjectConfig = field(default_factory=InjectConfig)


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


def _repo_path(rel: str) -> str:
    return str(REPO_ROOT / rel)


def register() -> None:
    """Register the schema and the `${repo:...}` resolver (absolute paths inside the repository)."""
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", _repo_path)
    ConfigStore.instance().store(name="schema", node=Config)


CHOICES = {
    ("model", "attention"): ("mha", "gqa", "mla"),
    ("model", "ffn"): ("dense", "moe"),
    ("model", "moe.router"): ("none", "softmax_aux", "aux_free", "bslo"),
    ("model", "residual_init"): ("scaled", "plain"),
    ("model", "residual.kind"): ("standard", "hc", "mhc"),
    ("model", "residual.init"): ("hc", "megatron"),
    ("model", "residual.phi_init"): ("normal", "xavier"),
    ("model", "residual.collapse"): ("sum", "head"),
    ("model", "residual.kernel"): ("eager", "fused"),
    ("monitor", "response"): ("log", "skip_step", "rollback", "stop"),
    ("monitor", "loss.response"): (None, "log", "skip_step", "rollback", "stop"),
    ("monitor", "grad_norm.response"): (None, "log", "skip_step", "rollback", "stop"),
    ("monitor", "nonfinite.response"): ("skip_step", "rollback", "stop"),
    ("monitor", "inject.kind"): ("loss", "nan", "poison"),
    ("model", "norm.depth_scaling"): ("none", "lns"),
    ("model", "signal_scaling"): ("none", "bslo"),
    ("data", "tokenizer.model_type"): ("bpe", "unigram"),
    ("data", "format"): ("text", "pretokenized"),
    ("data", "utf8_errors"): ("replace", "strict"),
    ("data", "prepare.dtype"): ("auto", "uint16", "uint32"),
    ("engine", "offload_optimizer"): ("none", "cpu"),
    ("engine", "offload_param"): ("none", "cpu"),
    ("engine", "backend"): ("auto", "nccl", "gloo"),
    ("precision", "dtype"): ("fp32", "bf16"),
    ("optim", "schedule"): ("cosine", "wsd", "constant", "step"),
    ("logging", "mode"): ("auto", "online", "offline"),
    ("trainer", "device"): ("auto", "cpu", "cuda"),
}


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure is one line naming the key."""
    for (group, key), allowed in CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(getattr(cfg, group)), key)
        if value not in allowed:
            raise ConfigError(f"{group}.{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    m, t = cfg.model, cfg.trainer
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model head dimension {m.d_model // m.n_heads} must be even for rotary embeddings")
    if m.attention == "gqa" and (m.n_kv_heads is None or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"model.attention=gqa needs model.n_kv_heads dividing model.n_heads={m.n_heads}, got {m.n_kv_heads}")
    r = m.residual
    if r.streams < 1:
        raise ConfigError(f"model.residual.streams={r.streams} must be >= 1")
    if r.kind == "standard" and r.streams != 1:
        raise ConfigError(f"model.residual.streams={r.streams} needs model.residual.kind=hc or mhc")
    if r.sinkhorn_iters < 1:
        raise ConfigError(f"model.residual.sinkhorn_iters={r.sinkhorn_iters} must be >= 1")
    if r.kernel == "fused" and r.kind != "mhc":
        raise ConfigError(f"model.residual.kernel=fused exists for model.residual.kind=mhc only (got {r.kind})")
    if m.qk_norm and m.attention == "mla":
        raise ConfigError("model.qk_norm applies to model.attention=mha|gqa (MLA normalises its latents already)")
    if m.logit_z_loss < 0:
        raise ConfigError(f"model.logit_z_loss={m.logit_z_loss} must be >= 0")
    o = cfg.optim
    if o.grad_clip_warmup_steps < 0 or not 0 < o.grad_clip_warmup_start <= 1:
        raise ConfigError("optim.grad_clip_warmup_steps must be >= 0 and optim.grad_clip_warmup_start in (0, 1]")
    if o.grad_clip_warmup_steps and not o.grad_clip:
        raise ConfigError("optim.grad_clip_warmup_steps needs optim.grad_clip > 0")
    if cfg.monitor.gain_interval < 0:
        raise ConfigError(f"monitor.gain_interval={cfg.monitor.gain_interval} must be >= 0 (0: off)")
    mon = cfg.monitor
    for name in ("loss", "grad_norm"):
        det = getattr(mon, name)
        if det.window < 2 or det.sigma < 0 or det.max_ratio < 0:
            raise ConfigError(f"monitor.{name}: window must be >= 2, sigma and max_ratio >= 0 (0: rule off)")
    if mon.inject.step is not None and mon.inject.step < 1:
        raise ConfigError(f"monitor.inject.step={mon.inject.step} must be >= 1 (steps are counted from 1)")
    if mon.rollback_skip_batches < 0 or mon.max_rollbacks < 0:
        raise ConfigError("monitor.rollback_skip_batches and monitor.max_rollbacks must be >= 0")
    for r in t.skip_batches:
        if len(r) != 2 or not 0 <= r[0] < r[1]:
            raise ConfigError(f"trainer.skip_batches entry {list(r)} must be [start, end) with 0 <= start < end")
    if not 0 <= cfg.engine.zero_stage <= 3:
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage} must be 0, 1, 2 or 3")
    if cfg.engine.offload_param != "none" and cfg.engine.zero_stage != 3:
        raise ConfigError("engine.offload_param needs engine.zero_stage=3")
    ep = cfg.engine.expert_parallel
    if ep < 1:
        raise ConfigError(f"engine.expert_parallel={ep} must be >= 1")
    if ep > 1:
        if cfg.model.ffn != "moe":
            raise ConfigError(f"engine.expert_parallel={ep} needs MoE layers (model.ffn=moe)")
        if cfg.model.moe.n_routed % ep:
            raise ConfigError(f"model.moe.n_routed={cfg.model.moe.n_routed} is not divisible by "
                              f"engine.expert_parallel={ep}")
        if cfg.engine.zero_stage != 0 or cfg.precision.dtype != "fp32":
            # ZeRO-1/2 and DeepSpeed's bf16 optimizer reduce gradients inside DeepSpeed, which would average
            # different experts together; only DeepSpeed's own MoE layer class gets expert groups there.
            raise ConfigError(f"engine.expert_parallel={ep} runs with engine=zero0 and precision=fp32 for now "
                              f"(got zero_stage={cfg.engine.zero_stage}, dtype={cfg.precision.dtype})")
    if cfg.engine.offload_optimizer != "none" and cfg.engine.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_interval", "eval_batches"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        raise ConfigError(f"trainer.stop_at={t.stop_at} must lie in 1..trainer.max_steps={t.max_steps}")
    o = cfg.optim
    if o.schedule == "step" and len(o.step_milestones) != len(o.step_factors):
        raise ConfigError("optim.step_milestones and optim.step_factors must have the same length")
    validate_data(cfg.data)
    if cfg.data.doc_mask and cfg.model.attention == "mla":
        raise ConfigError("data.doc_mask=true is not supported with model.attention=mla (use mha or gqa)")


def validate_data(d: DataConfig) -> None:
    """Data checks that need no tokenizer or network: values, files and globs, the prepared directory."""
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
    if d.prepare.workers < 1 or d.prepare.shard_docs < 1:
        raise ConfigError("data.prepare.workers and data.prepare.shard_docs must be >= 1")
    if d.format == "pretokenized":
        if not d.path:
            raise ConfigError("data.format=pretokenized needs data.path=<directory written by python -m stabletrain.data.prepare>")
        if not (Path(d.path) / "manifest.json").is_file():
            raise ConfigError(f"data.path={d.path} holds no manifest.json (write it with: python -m "
                              f"stabletrain.data.prepare data={d.name} out={d.path})")
    for name, src in d.source_configs().items():
        prefix = f"data.sources.{name}." if d.sources else "data."
        if src.weight <= 0:
            raise ConfigError(f"{prefix}weight={src.weight} must be > 0")
        if src.val_docs < 0 or (src.max_docs is not None and src.max_docs < 1):
            raise ConfigError(f"{prefix}val_docs must be >= 0 and {prefix}max_docs >= 1 (or null)")
        if d.format == "pretokenized" or src.hf_id:
            continue  # the manifest is checked at load; hub sources are only reachable at run time
        if not src.train_files:
            hint = " (data=local needs data.path=<glob of jsonl/parquet/txt files>)" if not d.sources else ""
            raise ConfigError(f"{prefix}train_files is empty{hint}")
        for key in ("train_files", "val_files"):
            for pattern in getattr(src, key):
                if not (glob.glob(pattern) if glob.has_magic(pattern) else Path(pattern).is_file()):
                    raise ConfigError(f"{prefix}{key}: file not found: {pattern}")


def to_object(cfg: DictConfig) -> Config:
    """Resolved, typed copy of a composed config."""
    return OmegaConf.to_object(cfg)


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep what names the problem, drop search paths and hints."""
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith(("Config search path", "provider=", "Set the environment", "reference_type",
                                "object_type", "To append")):
                if line.startswith("Config search path"):
                    break
                continue
            if line and line not in parts:
                parts.append(line)
    return "; ".join(parts).replace(":; ", ": ").replace(".; ", "; ")


def check_overrides(argv: list[str], config_dir: Path, config_name: str = "config") -> str | None:
    """Compose once with the command-line overrides; return a one-line error, or None when they compose.

    Hydra reports the same errors over several lines; this runs first so a typo costs the user one line.
    Sweeps (-m) are left to Hydra, which composes each job itself.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except Exception as e:  # any composition failure is the user's input, reported as such
        return _one_line(e)
    return None
