"""The data-parallel engine: DeepSpeed ZeRO 0-3 in fp32 or bf16, with expert parallelism applied from outside.

All contact with DeepSpeed's engine and its internals lives here: the generated DeepSpeed config, initialisation,
the gradient-reduction switch, clipping (ours for fp32 ZeRO-0, DeepSpeed's otherwise), the update veto inside
the optimizer, the LR-schedule rewind after a veto, checkpoints and reading weights for forensics.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from omegaconf import OmegaConf

from stabletrain.config import Config
from stabletrain.engine import checkpoint, safe_load
from stabletrain.engine.base import Engine, StepOutcome
from stabletrain.engine.expert_parallel import ExpertParallel
from stabletrain.engine.optim import (
    GatedAdamW,
    clip_threshold,
    first_nonfinite,
    lr_multiplier,
    param_groups,
    rewind_scheduler,
)


def clips_in_engine(cfg: Config) -> bool:
    """DeepSpeed reports the pre-clip norm only for its ZeRO/bf16 optimizers; plain fp32 ZeRO-0 we clip ourselves."""
    return cfg.engine.zero_stage > 0 or cfg.precision.dtype != "fp32"


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    t, e = cfg.trainer, cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": e.offload_optimizer}
    if e.offload_param != "none":
        zero["offload_param"] = {"device": e.offload_param}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip if clips_in_engine(cfg) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer: no C++ build
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer does the logging
        "wall_clock_breakdown": False,
    }
    overrides = OmegaConf.to_container(OmegaConf.create(dict(e.ds_config)), resolve=True)
    return OmegaConf.to_container(OmegaConf.merge(ds, overrides))


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, model: torch.nn.Module, world: int, rank: int):
        self.cfg, self.model, self.world = cfg, model, world
        ep = cfg.engine.expert_parallel
        self.expert_parallel = ExpertParallel(model, ep, world, rank) if ep > 1 else None
        o = cfg.optim
        # AdamW with a veto on the update (the spike responses): DeepSpeed wraps it as its client optimizer.
        self.optimizer = GatedAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_multiplier, cfg=cfg))
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world)
        )
        if cfg.engine.zero_stage == 0 and (world == 1 or self.expert_parallel is not None):
            # One rank has nothing to reduce, but ZeRO-0 would still flatten, "all-reduce" and copy back every
            # gradient. With expert parallelism the reduction is ours (ExpertParallel.reduce_gradients).
            self.ds.enable_backward_allreduce = False
        if self.expert_parallel is not None:
            self.expert_parallel.restore_experts()
        safe_load.install(self.ds)  # checkpoints are loaded with weights_only=True
        self.device = self.ds.device

    # ---------------------------------------------------------------- the step
    def forward(self, inputs, targets, **model_kwargs) -> torch.Tensor:
        return self.ds(inputs, targets, **model_kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def micro_step(self) -> None:
        self.ds.step()  # not an accumulation boundary: DeepSpeed only counts it

    def step(self, step: int, judge: Callable[[float | None], bool]) -> StepOutcome:
        """Clip, then let `judge(grad_norm)` veto the update from inside the optimizer, where DeepSpeed has the
        global gradient norm (ZeRO-1/2/3, bf16) and nothing has changed yet."""
        clip = clip_threshold(self.cfg, step)
        grad_norm = None
        if clips_in_engine(self.cfg):
            if self.cfg.optim.grad_clip_warmup_steps:
                self.ds.optimizer.clip_grad = clip  # DeepSpeed's ZeRO/bf16 optimizers read it every step
        elif self.expert_parallel is not None:
            self.expert_parallel.reduce_gradients()
            grad_norm = float(self.expert_parallel.clip_grad_norm_(clip))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        epoch_before = self.ds.lr_scheduler.last_epoch
        seen: list[float | None] = []

        def gate() -> bool:
            gn = grad_norm if grad_norm is not None else getattr(self.ds.optimizer, "_global_grad_norm", None)
            seen.append(None if gn is None else float(gn))
            return judge(seen[0])

        self.optimizer.gate = gate
        self.ds.step()
        answer = self.optimizer.reset_gate()
        if answer is None:  # the optimizer never ran: DeepSpeed skipped the step itself (non-finite gradients)
            return StepOutcome(self._global_grad_norm(), None)
        if not answer:  # vetoed: DeepSpeed still stepped the LR schedule, which must not advance
            rewind_scheduler(self.ds.lr_scheduler, epoch_before)
        return StepOutcome(seen[0], answer)

    def _global_grad_norm(self) -> float | None:
        gn = self.ds.get_global_grad_norm()
        return None if gn is None else float(gn)

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]  # the rate this step uses (the scheduler advances inside the step)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # ---------------------------------------------------------------- state
    def save(self, root: Path, step: int, client_state: dict, keep: int) -> Path:
        rank_state = (
            {"local_experts": self.expert_parallel.local_state(self.optimizer)}
            if self.expert_parallel is not None
            else None
        )
        return checkpoint.save(self.ds, root, step, client_state, keep, rank_state)

    def load(self, tag_dir: Path) -> dict:
        state = checkpoint.load(self.ds, tag_dir)
        if self.expert_parallel is not None:
            self.expert_parallel.load_local_state(checkpoint.load_rank_state(tag_dir)["local_experts"], self.optimizer)
        return state

    def first_nonfinite(self) -> str | None:
        return first_nonfinite(self.model, self.optimizer)

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """fp32 copies of all weights, or None where ranks hold shards (ZeRO-3, expert parallelism)."""
        if self.cfg.engine.zero_stage == 3 or self.expert_parallel is not None:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def adam_state(self) -> dict[str, dict] | None:
        """name -> Adam moments and hyper-parameters, where they are per parameter (ZeRO-0; ZeRO-1/2 keep flat
        partitions)."""
        if self.cfg.engine.zero_stage != 0:
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


def build_engine(cfg: Config, model: torch.nn.Module, world: int, rank: int) -> Engine:
    return DeepSpeedEngine(cfg, model, world, rank)
