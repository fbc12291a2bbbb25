"""The data-parallel engine: DeepSpeed ZeRO 0-3 in fp32 or bf16, over a model that stabletrain.parallel has
already adapted (FP8, recomputation, expert parallelism, compilation) and materialized. The pipeline engine
(stabletrain.engine.pipeline) extends it.

What a rank holds is the engine's to say (`rank_plan`), before anything is allocated: data parallelism holds every
parameter, ZeRO-3 its shard of each (partitioned as it is materialized, through DeepSpeed's zero.Init), a pipeline
stage its layers.

All contact with DeepSpeed's engine and its internals lives here and in pipeline.py: the generated DeepSpeed
config, initialisation, the gradient-reduction switch, clipping, the update veto inside the optimizer, the
LR-schedule rewind after a veto, checkpoints and reading weights for forensics.

Clipping: DeepSpeed's ZeRO/bf16 optimizers clip with the global norm they compute. Where that norm is not the whole
story it is done inside the gated optimizer step instead, after every reduction and before any update: fp32 ZeRO-0
(DeepSpeed does not report the norm there), pipelines in fp32 (the norm spans the stages) and expert parallelism
(the experts are ours, so the norm adds theirs to DeepSpeed's).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups as ds_groups
from omegaconf import OmegaConf

from stabletrain import StableTrainError, checkpoint
from stabletrain.checkpoint import background, safe_load
from stabletrain.config import Config, RankLayout, grad_accum_steps
from stabletrain.engine.base import Engine, LossHook, ModelKwargs, RankPlan, StepOutcome
from stabletrain.optim import (
    GatedAdamW,
    UpdateGate,
    clip_threshold,
    first_nonfinite,
    lr_multiplier,
    param_groups,
    rewind_scheduler,
)
from stabletrain.parallel.materialize import Ownership
from stabletrain.parallel.parallelize import Parallelized


def deepspeed_clips(cfg: Config) -> bool:
    """DeepSpeed clips (and reports the pre-clip norm) in its ZeRO/bf16 optimizers, unless experts are ours."""
    return (cfg.engine.zero_stage > 0 or cfg.precision.dtype != "fp32") and cfg.engine.expert_parallel == 1


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    t, e = cfg.trainer, cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": e.offload_optimizer}
    if e.offload_param != "none":
        zero["offload_param"] = {"device": e.offload_param}
    accum, dp = grad_accum_steps(cfg, world_size), world_size // e.pipeline_stages
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * dp,
        "gradient_clipping": cfg.optim.grad_clip if deepspeed_clips(cfg) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer: no C++ build
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer does the logging
        "wall_clock_breakdown": False,
    }
    overrides = OmegaConf.to_container(OmegaConf.create(dict(e.ds_config)), resolve=True)
    return OmegaConf.to_container(OmegaConf.merge(ds, overrides))


def _zero3_sharder(cfg: Config, world: int) -> Callable[[torch.nn.Parameter], int]:
    """Partitions one materialized parameter as ZeRO-3 does (DeepSpeed's zero.Init, here not as a context around
    construction but handed each parameter right after its initialisation); returns the elements this rank keeps."""
    init = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world))

    def shard(p: torch.nn.Parameter) -> int:
        init._convert_to_zero_parameters([p])
        return p.ds_tensor.numel()

    return shard


def train_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32


class DeepSpeedEngine(Engine):
    pipe_group = None  # the stages of this rank's pipeline (pipeline engine only)
    lr_scale = 1.0  # multiplies the schedule's rate (the spike ladder's learning-rate cut)

    @classmethod
    def rank_plan(cls, model: torch.nn.Module, cfg: Config, layout: RankLayout) -> RankPlan:
        """Every block; every parameter, or under ZeRO-3 a shard of each, cast to the training dtype first (ZeRO-3
        partitions in it)."""
        if cfg.engine.zero_stage == 3:
            own = Ownership(shard=_zero3_sharder(cfg, layout.world), dtype=train_dtype(cfg))
            return RankPlan(range(len(model.blocks)), own)
        return RankPlan(range(len(model.blocks)), Ownership())

    def __init__(self, cfg: Config, parallel: Parallelized, layout: RankLayout, plan: RankPlan):
        self.cfg, self.model, self.layout, self.plan = cfg, parallel.model, layout, plan
        module = self._wrap(self.model)  # what DeepSpeed trains: the model, or this rank's pipeline stage
        o, e = cfg.optim, cfg.engine
        self.experts = parallel.experts
        if self.experts is not None:
            self.experts.setup(self._device(), train_dtype(cfg), o.weight_decay, tuple(o.betas), o.eps)
        # AdamW with a veto on the update (the spike responses): DeepSpeed wraps it as its client optimizer. On a GPU
        # its fused kernel (one launch for every parameter), unless the states live in host memory (ZeRO-Offload).
        fused = self._device().type == "cuda" and e.offload_optimizer == "none"
        self.optimizer = GatedAdamW(
            param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_multiplier, cfg=cfg))
        if e.pipeline_stages == 1:
            ds_groups.mpu = None  # a pipeline engine built earlier in this process leaves its grid there
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, layout.world)
        )
        if e.zero_stage == 0 and layout.world == 1:
            # One rank has nothing to reduce, but ZeRO-0 would still flatten, "all-reduce" and copy back every
            # gradient.
            self.ds.enable_backward_allreduce = False
        safe_load.install(self.ds)  # checkpoints are loaded with weights_only=True
        self.device = self.ds.device
        self._after_initialize()

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module DeepSpeed trains (the pipeline engine: this rank's stage)."""
        return model

    def _after_initialize(self) -> None: ...

    @staticmethod
    def _device() -> torch.device:
        return torch.device(deepspeed.get_accelerator().current_device_name())

    # ---------------------------------------------------------------- the step
    def forward_backward(self, batches: list[torch.Tensor], model_kwargs: ModelKwargs, loss_hook: LossHook):
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=True)
            loss = loss_hook(self.ds(batch[:, :-1], batch[:, 1:], **model_kwargs(batch)))
            self.ds.backward(loss)
            loss_sum += loss.detach().float()
            if i < len(batches) - 1:
                self.ds.step()  # not an accumulation boundary: DeepSpeed only counts it
        return loss_sum / len(batches)

    def eval_loss(self, batch: torch.Tensor, model_kwargs: ModelKwargs) -> torch.Tensor:
        batch = batch.to(self.device)
        return self.ds(batch[:, :-1], batch[:, 1:], **model_kwargs(batch)).float()

    def _optimizer_step(self) -> None:
        self.ds.step()

    def step(self, step: int, judge: Callable[[float | None], bool]) -> StepOutcome:
        """Clip, then let `judge(grad_norm)` veto the update from inside the optimizer, where every gradient is
        reduced and nothing has changed yet."""
        clip = clip_threshold(self.cfg, step)
        if deepspeed_clips(self.cfg) and self.cfg.optim.grad_clip_warmup_steps:
            self.ds.optimizer.clip_grad = clip  # DeepSpeed's ZeRO/bf16 optimizers read it every step
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:  # an escalation's cut, for this update (the schedule sets the next)
            group["lr"] *= self.lr_scale
        epoch_before = self.ds.lr_scheduler.last_epoch
        apply_experts = self.experts.apply if self.experts is not None else None
        gate = self.optimizer.gate = UpdateGate(lambda: self._norm_and_clip(clip), judge, apply_experts)
        try:
            self._optimizer_step()
        finally:
            answer = self.optimizer.reset_gate()
            if self.experts is not None:
                self.experts.zero_grad()
        if answer is None:  # the optimizer never ran: DeepSpeed skipped the step itself (non-finite gradients)
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate
            return StepOutcome(self._global_grad_norm(), None)
        if not answer:  # vetoed: DeepSpeed still stepped the LR schedule, which must not advance
            rewind_scheduler(self.ds.lr_scheduler, epoch_before)
        return StepOutcome(gate.grad_norm, answer)

    def _norm_and_clip(self, clip: float) -> torch.Tensor | float | None:
        """The global pre-clip gradient norm (replicated parameters and every expert once), left on the device where
        it is computed here (the trainer reads it with the loss, in one host sync); clips where DeepSpeed does not."""
        # DeepSpeed's ZeRO/bf16 optimizers computed the global norm of their parameters before calling ours (the
        # engine's copy of it is updated only after the step).
        ds_norm = getattr(self.ds.optimizer, "_global_grad_norm", None)
        if deepspeed_clips(self.cfg):
            return ds_norm
        if self.cfg.engine.zero_stage > 0 or self.cfg.precision.dtype != "fp32":
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.as_tensor(float("nan") if ds_norm is None else ds_norm, device=self.device)
            sq = norm.double().pow(2)
        else:  # fp32 ZeRO-0: the optimizer's parameters are the module's (in module order, as clip_grad_norm_)
            params = [p for p in self.ds.module.parameters() if p.grad is not None]
            counted = [p.grad for p in params if not getattr(p, "ds_pipe_replicated", False)]
            local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros(())
            if self.pipe_group is None and self.experts is None:
                torch.nn.utils.clip_grads_with_norm_(params, clip, local)  # as clip_grad_norm_ (golden values)
                return local
            sq = local.double().pow(2).reshape(1)
            if self.pipe_group is not None:
                dist.all_reduce(sq, group=self.pipe_group)  # stages hold different parameters
            sq = sq[0]
        if self.experts is not None:
            sq = sq + self.experts.reduce_gradients().double()
        norm = sq.sqrt().float()
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        if self.experts is not None:
            self.experts.scale_gradients((clip / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def _global_grad_norm(self) -> float | None:
        gn = self.ds.get_global_grad_norm()
        return None if gn is None else float(gn)

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0] * self.lr_scale  # the rate this step uses (the scheduler advances in the step)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # ---------------------------------------------------------------- state
    def save(self, root: Path, step: int, client_state: dict, keep: int, writer=None) -> Path:
        rank_state = {"local_experts": self.experts.local_state()} if self.experts is not None else None
        if writer is not None:
            background.attach(self.ds, writer)  # DeepSpeed's files go to the writer as host copies
        try:
            return checkpoint.save(self.ds, root, step, client_state, keep, rank_state, self.layout_record(), writer)
        finally:
            self.ds.checkpoint_engine.writer = None

    def load(self, tag_dir: Path) -> dict:
        self._check_layout(checkpoint.layout_of(tag_dir))
        state = checkpoint.load(self.ds, tag_dir)
        if self.experts is not None:
            self.experts.load_local_state(checkpoint.load_rank_state(tag_dir)["local_experts"])
        return state

    def layout_record(self) -> dict:
        e = self.cfg.engine
        return {
            "world": self.layout.world,
            "pipeline_stages": e.pipeline_stages,
            "zero_stage": e.zero_stage,
            "expert_parallel": e.expert_parallel,
            "dtype": str(self.cfg.precision.dtype),
        }

    def _check_layout(self, saved: dict | None) -> None:
        """Before DeepSpeed reads anything: a layout it cannot resume from is one line, not a KeyError deep inside.
        fp32 ZeRO-0 without pipeline stages resumes on any number of ranks (trainer.global_batch_size keeps the
        batch); everything else needs the layout it was saved with."""
        now = self.layout_record()
        if saved is None or saved == now:
            return
        movable = {k: v for k, v in now.items() if k != "world"} == {k: v for k, v in saved.items() if k != "world"}
        if movable and now["zero_stage"] == 0 and now["dtype"] == "fp32" and now["pipeline_stages"] == 1:
            return
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
        raise StableTrainError(
            f"the checkpoint's layout differs ({diff}); resume with the layout it was saved with (only fp32 ZeRO-0 "
            "data parallelism resumes on another number of ranks)"
        )

    def first_nonfinite(self) -> str | None:
        where = first_nonfinite(self.ds.module, self.optimizer)
        return where or (self.experts.first_nonfinite() if self.experts is not None else None)

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """fp32 copies of all weights, or None where ranks hold shards (ZeRO-3, experts, pipeline stages)."""
        if self.cfg.engine.zero_stage == 3 or self.experts is not None or self.cfg.engine.pipeline_stages > 1:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def adam_state(self) -> dict[str, dict] | None:
        """name -> Adam moments and hyper-parameters, where they are per parameter (ZeRO-0 data parallel; ZeRO-1/2
        keep flat partitions)."""
        if self.cfg.engine.zero_stage != 0 or self.cfg.engine.pipeline_stages > 1:
            return None
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if "exp_avg" in state and id(p) in name_of:
                    out[name_of[id(p)]] = {
                        "exp_avg": state["exp_avg"],
                        "exp_avg_sq": state["exp_avg_sq"],
                        "step": int(state["step"]),
                        "lr": group["lr"],
                        "betas": group["betas"],
                        "eps": group["eps"],
                    }
        return out
