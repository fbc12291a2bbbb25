"""The training loop: each step reads its global batch, runs forward and backward over the micro-batches, and
asks the engine to apply the update, which the spike guard may veto; periodic validation and checkpoints;
everything else (metric sinks, gains, MoE balancing, forensics) hangs off callbacks.

Collaborators: the engine (stabletrain.engine: DeepSpeed, checkpoints), the spike guard (detection and the
response to a firing), the data (a sampler over packed sequences), resume (which checkpoint to start from),
stop signals, and the configured callbacks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from stabletrain import StableTrainError, checkpoint
from stabletrain import distributed as dist_utils
from stabletrain.config import Config, RankLayout, grad_accum_steps
from stabletrain.config.resolved import resolve
from stabletrain.data.build import build_data
from stabletrain.data.loader import RankLoader
from stabletrain.engine.build import engine_class
from stabletrain.models import count_params, meta_model, model_flops_per_token
from stabletrain.optim import clip_threshold
from stabletrain.parallel.materialize import materialize
from stabletrain.parallel.parallelize import parallelize
from stabletrain.training.callbacks import CALLBACKS, build_callbacks
from stabletrain.training.detectors import Action, StepResult
from stabletrain.training.perf import peak_flops, peak_memory_gib
from stabletrain.training.responder import SpikeResponder
from stabletrain.training.resume import resume
from stabletrain.training.saving import Saver
from stabletrain.training.signals import PREEMPT_FILE, StopSignals, pack_with_stop_flags, read_step
from stabletrain.training.spike_guard import SpikeGuard
from stabletrain.training.startup import Startup
from stabletrain.training.validation import validation_loss


@dataclass
class TrainedStep:
    metrics: dict  # the step's metrics row
    result: StepResult  # what the spike detectors made of it; whether its update was applied
    batch_index: int  # the global batch it read
    batches: list[torch.Tensor]  # its micro-batches (forensics replays them)


class Trainer:
    """Start-up: config (frozen) -> pre-flight (does the layout fit this rank?) -> data -> the model on the meta
    device -> parallelize -> each rank materializes what it owns -> the engine adapter. Each phase prints a line."""

    def __init__(self, cfg: Config, run_dir: Path, composed: dict, startup: Startup | None = None):
        self.cfg, self.run_dir, self.composed = cfg, run_dir, composed  # composed: config.yaml's content
        t = cfg.trainer
        for name in t.callbacks:
            CALLBACKS[name]  # an unknown name fails here, before anything heavy
        self.device = dist_utils.setup_device(t.device, cfg.engine.backend)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.startup = startup or Startup(self.rank)
        self.startup.rank = self.rank
        self.layout = RankLayout(self.world, self.rank, cfg.engine.pipeline_stages)
        self.is_main = self.rank == 0
        self.startup.preflight(cfg, self.world, self.device)
        self.data = build_data(cfg.data, t.seed, self.is_main)
        self.resolved = resolve(cfg, self.world, self.data.tokenizer.vocab_size)  # vocabulary, batch, layout
        accum = grad_accum_steps(cfg, self.world)
        self.loader = RankLoader(
            self.data.train, self.data.order, t.micro_batch_size, accum, self.layout.dp_rank, self.layout.data_parallel
        )
        self.startup.phase("data", f"{cfg.data.name}, vocabulary {self.resolved.vocab_size}")
        self._build_model()
        self.guard = SpikeGuard(cfg.monitor, t.skip_batches, self.resolved.vocab_size)
        self.responder, self.saver = SpikeResponder(self), Saver(self)
        self.step, self.stop_signal, self.callbacks, self.load_s = 0, None, [], None
        self._signals = StopSignals(self.say)  # entered by fit(); train_step() alone sees no signal
        events = resume(t.resume, run_dir, self.load, self.say, t.accept_legacy_checkpoints)
        self.resumed_step = self.step if events else None
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed))
            self.resolved.save(run_dir)
        self.callbacks = build_callbacks(t.callbacks, self, self.is_main)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # torchrun's agent restarted the group
        if restarts:
            self.event("restart", self.step, count=restarts, resumed_from=self.resumed_step)
        for kind, fields in events:
            self.event(kind, self.step, **fields)
        if self.load_s is not None:
            self.log({"step": self.step, "ckpt/load_s": self.load_s})
        if self.is_main:
            (run_dir / PREEMPT_FILE).unlink(missing_ok=True)  # a requeued job starts afresh
        self.peak, self.peak_source = peak_flops(self.device, cfg.precision.dtype, t.peak_tflops)

    def _build_model(self) -> None:
        """The model on the meta device, adapted to the hardware, then this rank's part allocated and initialised
        on its device (layout-independent values), then wrapped by the engine."""
        cfg, t = self.cfg, self.cfg.trainer
        torch.manual_seed(t.seed)
        self.model = meta_model(self.resolved.model(cfg))
        self.n_params = count_params(self.model)
        self.flops_per_token = model_flops_per_token(self.model, cfg.data.seq_len)
        self.startup.phase("meta build", f"{self.n_params:,} parameters")
        engine_cls = engine_class(cfg)
        plan = engine_cls.rank_plan(self.model, cfg, self.layout)
        self.parallel = parallelize(self.model, cfg, self.layout, plan.blocks, self.device)
        self.startup.phase("parallelize", self.parallel.describe(cfg, plan.blocks))
        self.materialized = materialize(self.model, self.device, t.seed, plan.ownership, self.parallel.extra_modules())
        self.startup.phase("materialize", self.materialized.describe(self.rank, self.device), self.device, True)
        self.engine = engine_cls(cfg, self.parallel, self.layout, plan)
        self.startup.phase("engine", f"DeepSpeed ZeRO-{cfg.engine.zero_stage} ready", self.device)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> float:
        t = self.cfg.trainer
        last = t.stop_at or t.max_steps
        self.say(
            f"model: {self.n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; {self.world} "
            f"rank(s), global batch {self.loader.global_batch_size}×{self.cfg.data.seq_len} tokens; MFU "
            f"peak: {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})"
        )
        val = None
        with StopSignals(self.say, self.run_dir / PREEMPT_FILE if self.is_main else None) as self._signals:
            if self.step == 0:
                val = self._validate_and_log()
            while self.step < last and self.stop_signal is None:
                self.saver.poll()  # completes an asynchronous save once every rank's writer is done
                self.hook("on_step_begin", self.step + 1)
                done = self.train_step()
                metrics = done.metrics
                self.startup.first_steps(metrics, self.step, self.parallel.compiled, self.device)
                if not done.result.applied or done.result.fired:
                    if self.responder.respond(done.result, done.batch_index, done.batches) == Action.ROLLBACK:
                        continue
                self.hook("on_step_end", self.step, metrics)
                if self.step % t.log_interval == 0 or self.step == last or any(k.startswith("gain/") for k in metrics):
                    self.log(metrics)
                if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == last:
                    val = self._validate_and_log()
                if (t.ckpt_interval and self.step % t.ckpt_interval == 0) or self.step == last or self.stop_signal:
                    self.save()
            self.saver.wait()
        if self.stop_signal:
            if self.stop_signal != signal.SIGINT:  # a scheduler's preemption or time limit: requeue and resume
                self.event("preempted", self.step, signal=dist_utils.signal_name(self.stop_signal))
            self.say(
                f"stopped by {dist_utils.signal_name(self.stop_signal)} at step {self.step}; checkpoint "
                f"{checkpoint.tag_for(self.step)} saved (continue with trainer.resume=auto)"
            )
            return float("nan")
        return val["val_loss"] if val else float("nan")

    def train_step(self) -> TrainedStep:
        step = self.step + 1
        self.engine.lr_scale = self.guard.lr_scale(step)  # an escalation's learning-rate cut, while it lasts
        t0, lr = time.perf_counter(), self.engine.lr
        G = self.loader.global_batch_size
        batch_index = self.guard.next_batch(self.loader.samples_consumed // G)  # skip lists jump whole batches
        self.loader.samples_consumed = batch_index * G
        inject = self.guard.injection(step, batch_index)
        batches = self.guard.perturb_batches(inject, self.loader.next_batch())
        perturb = lambda loss: self.guard.perturb_loss(inject, loss)  # noqa: E731
        local = self.engine.forward_backward(batches, self.data.model_kwargs, perturb)
        packed = pack_with_stop_flags(local, self._signals.poll(), self.world)
        judged: list[StepResult] = []
        read: list = []  # (loss, grad norm): read from the device once per step, by the judge

        def judge(grad_norm) -> bool:  # the UpdateGate asks it from inside the optimizer, before anything changes
            read[:] = self._read(packed, grad_norm)
            judged.append(self.guard.judge(step, *read))
            return judged[0].applied

        outcome = self.engine.step(step, judge)
        loss, grad_norm = read or self._read(packed, outcome.grad_norm)
        result = judged[0] if judged else self.guard.engine_skipped(step, loss, grad_norm)
        self.step, elapsed, samples = step, time.perf_counter() - t0, self.loader.samples_consumed
        tps = G * self.cfg.data.seq_len / elapsed
        row = {
            "step": step,
            "tokens": samples * self.cfg.data.seq_len,
            "samples": samples,
            **self.data.source_tokens(samples),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": self.flops_per_token * tps / (self.peak * self.world),
            "step_time_s": elapsed,
            "mem/peak_gib": peak_memory_gib(self.device),
        }
        if self.cfg.optim.grad_clip_warmup_steps:
            row["grad_clip"] = clip_threshold(self.cfg, step)
        if not result.applied:
            row["update_skipped"] = 1
        return TrainedStep(row, result, batch_index, batches)

    def _read(self, packed: torch.Tensor, grad_norm) -> tuple[float, float | None]:
        loss, grad_norm, stop = read_step(packed, grad_norm)
        self.stop_signal = self.stop_signal or stop
        return loss, grad_norm

    def _validate_and_log(self) -> dict:
        t = self.cfg.trainer
        self.hook("on_eval_begin", self.step)
        val = validation_loss(self.engine, self.data, t.micro_batch_size, t.eval_batches)
        self.hook("on_eval_end", self.step, val)
        self.log({"step": self.step, **val})
        self.say(f"step {self.step}: val_loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})")
        return val

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> None:
        self.refuse_nonfinite_state()
        state = {
            "step": self.step,
            "samples_consumed": self.loader.samples_consumed,
            "world_size": self.world,
            **self.guard.state_dict(),
        }
        tag_dir = self.saver.save(state)  # warns when the disk is nearly full
        self.hook("on_checkpoint", self.step, tag_dir)

    def load(self, tag_dir: Path) -> checkpoint.Rejection | None:
        """Collective: restore a verified checkpoint on every rank; why it failed on any rank, or None."""
        reason, t0 = None, time.perf_counter()
        self.saver.wait()
        try:
            state = self.engine.load(tag_dir)
            self.step, self.loader.samples_consumed = int(state["step"]), int(state["samples_consumed"])
            self.guard.load_state_dict(state)
        except Exception as e:  # a corrupt file surfaces as whatever torch/DeepSpeed raise while reading it
            reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if dist_utils.any_rank(reason is not None, self.device) and reason is None:
            reason = "unreadable on another rank"
        if reason is None:
            self.load_s = time.perf_counter() - t0
            return None
        self.step, self.loader.samples_consumed = 0, 0
        return checkpoint.Rejection(None, reason, partial=True)

    def refuse_nonfinite_state(self) -> None:
        """Collective. A checkpoint never stores NaN/Inf: raise (one line, an event; older checkpoints stay)."""
        where = self.engine.first_nonfinite()
        if not dist_utils.any_rank(where is not None, self.device):
            return
        where = where or "a tensor on another rank"
        intact = [d.name for d, r in checkpoint.candidates(self.run_dir / "checkpoints") if r is None] + ["none"]
        self.event("checkpoint_refused", self.step, reason=f"{where} holds NaN/Inf")
        raise StableTrainError(
            f"step {self.step}: {where} holds NaN/Inf; refusing to write a checkpoint (newest "
            f"intact one: {intact[0]}; continue from it with trainer.resume=auto, optionally "
            "with trainer.skip_batches)"
        )

    # ---------------------------------------------------------------- output
    def hook(self, name: str, *args) -> list:
        return [getattr(cb, name)(self, *args) for cb in self.callbacks]

    def log(self, row: dict) -> None:
        self.hook("on_log", row)

    def event(self, kind: str, step: int, **fields) -> None:
        self.hook("on_event", kind, step, fields)

    def say(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        self.saver.wait()
        for cb in self.callbacks:
            cb.close()
