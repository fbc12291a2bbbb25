"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Composition merges the YAML files in `conf/` over these dataclasses, so a misspelt key or a wrong type fails
at compose time naming the key. `validate()` adds the cross-field checks a type system cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

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
    path: str = MISSING  # sentencepiece .model file; trained from data.train_files when missing
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram


@dataclass
class DataConfig:
    name: str = "shakespeare"
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    text_field: str = "text"
    seq_len: int = 256
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


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
    log_interval: int = 1
    seed: int = 1234
    resume: str = "none"  # none | auto | <checkpoints dir of another run>
    peak_tflops: Optional[float] = None  # for MFU; None: known GPU table, or a measured CPU matmul peak
    device: str = "auto"  # auto | cpu | cuda
    plan: bool = False  # print parameters, FLOPs and per-GPU memory for the configured run, then exit
    plan_world_size: Optional[int] = None  # plan for this many GPUs (None: WORLD_SIZE or 1)


@dataclass
class MonitorConfig:
    name: str = "default"
    gain_interval: int = 25  # signal-gain diagnostics every N steps (gain/* metrics); 0: off


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
    ("model", "norm.depth_scaling"): ("none", "lns"),
    ("model", "signal_scaling"): ("none", "bslo"),
    ("data", "tokenizer.model_type"): ("bpe", "unigram"),
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
            raise ConfigError(f"{group}.{key}={value!r} is not one of {', '.join(allowed)}")
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
    if cfg.monitor.gain_interval < 0:
        raise ConfigError(f"monitor.gain_interval={cfg.monitor.gain_interval} must be >= 0 (0: off)")
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
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be >= 2")
    for key in ("train_files", "val_files"):
        files = getattr(cfg.data, key)
        if not files:
            raise ConfigError(f"data.{key} is empty")
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"data.{key}: file not found: {f}")


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
