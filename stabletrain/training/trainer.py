"""The training loop: forward, backward, step, schedule; periodic validation; checkpoints; metrics.

Everything around the loop hangs off Callback hooks so the loop itself stays short.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from stabletrain import StableTrainError
from stabletrain.config import Config
from stabletrain.data.dataset import RankLoader
from stabletrain.data.setup import build_data
from stabletrain import distributed as dist_utils
from stabletrain.engine.deepspeed_engine import build_engine, clip_threshold, clips_in_engine, first_nonfinite
from stabletrain.engine.expert_parallel import ExpertParallel
from stabletrain.models import build_model, flops_per_token, param_count
from stabletrain.monitoring.sinks import MetricsLogger, NullLogger
from stabletrain.training import checkpoint
from stabletrain.training.perf import peak_flops
from stabletrain.training.spikes import SkipList, SpikeMonitor, Verdict, rewind_scheduler


class Callback:
    """Hooks the trainer calls; subclasses override what they need."""

    def on_step_begin(self, trainer: "Trainer", step: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict) -> None:
        """May add keys to metrics before they are logged."""

    def on_eval_begin(self, trainer: "Trainer", step: int) -> None: ...

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict) -> None:
        """May add keys to the evaluation metrics before they are logged."""

    def on_checkpoint(self, trainer: "Trainer", step: int, tag_dir: Path) -> None: ...


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resolved: dict):
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.trainer
        self.device = dist_utils.default_device(t.device)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals slow CPU steps up to 8x (PLATFORM.md)
        else:
            torch.cuda.set_device(self.device)
        dist_utils.init_process_group(dist_utils.backend_for(self.device, cfg.engine.backend))
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0

        self.data = data = build_data(cfg.data, t.seed, self.is_main)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = data.tokenizer.vocab_size
        elif cfg.model.vocab_size < data.tokenizer.vocab_size:
            raise StableTrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                   f"{data.tokenizer.vocab_size}")
        self.train_data, self.val_data = data.train, data.val  # each split's samples, checked non-empty
        self.loader = RankLoader(self.train_data, data.order, t.micro_batch_size, t.grad_accum_steps, self.rank,
                                 self.world)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model)
        if t.compile:  # per block: graphs shared by the layers, and the engine still sees the plain module
            import torch._dynamo.config as dynamo_config

            # Layer-specific constants (e.g. LNS's 1/sqrt(l)) specialise a graph per layer: allow one per layer.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * cfg.model.n_layers)
            for block in self.model.blocks:
                block.compile()
        self.expert_parallel = (ExpertParallel(self.model, cfg.engine.expert_parallel, self.world, self.rank)
                                if cfg.engine.expert_parallel > 1 else None)
        self.n_params = param_count(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.engine = build_engine(cfg, self.model, self.world)
        if self.expert_parallel is not None:
            self.expert_parallel.restore_experts()
        self.step = 0
        self.spikes = SpikeMonitor(cfg.monitor)
        self.skips = SkipList(t.skip_batches)
        self.rollbacks: list[int] = []  # steps at which a rollback happened (capped by monitor.max_rollbacks)
        self._injected = False
        self._half_loaded = False
        self.last_step: tuple | None = None
        self.stop_signal: int | None = None  # SIGTERM/SIGINT: finish the step, checkpoint, stop

        resume_events = self._resume()
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            self.logger = MetricsLogger(cfg, run_dir, resolved, self.step if resume_events else None)
            for note in self.logger.repairs:
                self._say(note)
        else:
            self.logger = NullLogger()
        for kind, fields in resume_events:
            self.logger.event(kind, self.step, **fields)
        self.peak, self.peak_source = peak_flops(self.device, cfg.precision.dtype, t.peak_tflops)
        self.callbacks: list[Callback] = default_callbacks(cfg)

    # ---------------------------------------------------------------- resume
    def _resume(self) -> list[tuple[str, dict]]:
        """Load the checkpoint trainer.resume points at; return the events to record.

        auto: the newest intact checkpoint of this run (damaged ones are skipped, each with a
        `checkpoint_rejected` event), or a fresh start when there is none. A checkpoint directory (step_*): that
        one, or a one-line error. A directory of checkpoints: its newest intact one, or an error."""
        mode = self.cfg.trainer.resume
        own = self.run_dir / "checkpoints"
        if mode == "none":
            if checkpoint.tags_newest_first(own):
                # Training from scratch here would interleave two runs' metrics and prune the old checkpoints.
                raise StableTrainError(f"{self.run_dir} already holds checkpoints: pass trainer.resume=auto to "
                                       "continue that run, or choose another hydra.run.dir")
            return []
        path = own if mode == "auto" else Path(mode)
        exact = checkpoint.TAG_RE.match(path.name) is not None
        tags = [path] if exact else checkpoint.tags_newest_first(path)
        events: list[tuple[str, dict]] = []
        rejected: list[list[str]] = []
        damaged = False
        for tag_dir in tags:
            rejection = checkpoint.verify(tag_dir) or self._try_load(tag_dir)
            if rejection is None:
                self._say(f"resumed from {tag_dir} at step {self.step}")
                return events + [("resume", {"checkpoint": str(tag_dir), "rejected": rejected})]
            if exact:
                raise StableTrainError(f"trainer.resume={tag_dir}: {rejection}")
            self._say(f"resume: skipping checkpoint {tag_dir.name}: {rejection}")
            events.append(("checkpoint_rejected", {"checkpoint": str(tag_dir), "file": rejection.file,
                                                   "reason": rejection.reason}))
            rejected.append([tag_dir.name, str(rejection)])
            damaged |= not rejection.interrupted
        if self._half_loaded or (damaged and mode == "auto"):
            # A failed load may have left half-restored state behind, and a fresh start would overwrite damaged
            # checkpoints someone may want to inspect or repair: stop instead.
            raise StableTrainError(f"no checkpoint in {path} could be loaded ({'; '.join(': '.join(r) for r in rejected)}); "
                                   "move them away to start fresh")
        if mode != "auto":
            raise StableTrainError(f"trainer.resume={mode}: no intact checkpoint ({'; '.join(': '.join(r) for r in rejected)})")
        self._say(f"resume=auto: no {'intact ' if tags else ''}checkpoint in {path}; starting fresh")
        return events + [("resume", {"checkpoint": None, "rejected": rejected})]

    def _try_load(self, tag_dir: Path) -> checkpoint.Rejection | None:
        """Load a verified checkpoint on every rank; why it failed on any rank, or None."""
        reason = None
        try:
            state = checkpoint.load(self.engine, tag_dir)
            if self.expert_parallel is not None:
                self.expert_parallel.load_local_state(checkpoint.load_rank_state(tag_dir)["local_experts"],
                                                      self.engine.optimizer)
            self.step = int(state["step"])
            self.loader.samples_consumed = int(state["samples_consumed"])
            if "spike_monitor" in state:
                self.spikes.load_state_dict(state["spike_monitor"])
                self.skips.merge(state["skip_batches"])
                self.rollbacks = sorted(set(self.rollbacks) | set(state["rollbacks"]))
        except Exception as e:  # a corrupt file surfaces as whatever torch/DeepSpeed raise while reading it
            reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self._half_loaded = True
        failed = torch.tensor(float(reason is not None), device=self.device)
        if self.world > 1:
            dist.all_reduce(failed)
        if failed.item() and reason is None:
            reason = "unreadable on another rank"
        if reason is not None:
            self.step, self.loader.samples_consumed = 0, 0
            return checkpoint.Rejection(None, reason)
        return None

    # ---------------------------------------------------------------- steps
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        accum, step = self.cfg.trainer.grad_accum_steps, self.step + 1
        G = self.loader.global_batch_size
        batch_index = self.loader.samples_consumed // G
        allowed = self.skips.next_allowed(batch_index)
        if allowed != batch_index:  # trainer.skip_batches or a rollback: jump over whole global batches
            self.loader.samples_consumed, batch_index = allowed * G, allowed
        batches = self.loader.next_batch()
        inject = self._injection(step, batch_index)
        if inject == "poison":  # testing aid: one rare token repeated, a batch that spikes from any state
            batches = [torch.full_like(b, self.cfg.model.vocab_size - 1) for b in batches]
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for i, batch in enumerate(batches):
            batch = batch.to(self.engine.device, non_blocking=True)
            loss = self.engine(batch[:, :-1], batch[:, 1:], **self.data.model_kwargs(batch))
            if inject == "loss":
                loss = loss * self.cfg.monitor.inject.scale
            elif inject == "nan_loss":
                loss = loss * float("nan")
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if i == accum - 1:
                mean_loss = self._global_mean_loss(loss_sum / accum)
                clip = clip_threshold(self.cfg, step)
                if clips_in_engine(self.cfg) and self.cfg.optim.grad_clip_warmup_steps:
                    self.engine.optimizer.clip_grad = clip  # DeepSpeed's ZeRO/bf16 optimizers read it each step
                if not clips_in_engine(self.cfg):
                    if self.expert_parallel is not None:
                        self.expert_parallel.reduce_gradients()
                        grad_norm = self.expert_parallel.clip_grad_norm_(clip)
                    else:
                        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self._arm_veto(step, mean_loss, None if grad_norm is None else float(grad_norm))
            self.engine.step()
        verdict = self._disarm_veto(step, mean_loss)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.step = step
        self.last_step = (verdict, batch_index, batches)
        elapsed = time.perf_counter() - t0
        tps = G * self.cfg.data.seq_len / elapsed
        row = {"step": self.step, "tokens": self.loader.samples_consumed * self.cfg.data.seq_len,
               "samples": self.loader.samples_consumed, **self.data.source_tokens(self.loader.samples_consumed),
               "loss": mean_loss,
               "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens_per_s": tps, "mfu": self.flops_per_token * tps / (self.peak * self.world),
               "step_time_s": elapsed}
        if self.cfg.optim.grad_clip_warmup_steps:
            row["grad_clip"] = clip
        if not verdict.applied:
            row["update_skipped"] = 1
        return row

    def _global_mean_loss(self, local_mean: torch.Tensor) -> float:
        """Mean loss over ranks; the same all-reduce carries any rank's stop signal (SIGINT wins over SIGTERM)."""
        flags = [float(self.stop_signal == s) for s in (signal.SIGINT, signal.SIGTERM)]
        packed = torch.stack([local_mean, torch.tensor(flags, device=local_mean.device)[0],
                              torch.tensor(flags, device=local_mean.device)[1]])
        if self.world > 1:
            dist.all_reduce(packed)
            packed[0] /= self.world
        if packed[1] > 0:
            self.stop_signal = signal.SIGINT
        elif packed[2] > 0:
            self.stop_signal = signal.SIGTERM
        return float(packed[0])

    def _injection(self, step: int, batch_index: int) -> str | None:
        """monitor.inject (a testing aid): `poison` is tied to the data (the batch of an uninterrupted run's
        step, so a rollback that skips it clears it); `loss`/`nan_loss` perturb the state once per process."""
        inj = self.cfg.monitor.inject
        if inj.step is None:
            return None
        if inj.kind == "poison":
            return "poison" if batch_index == inj.step - 1 else None
        if step == inj.step and not self._injected:
            self._injected = True
            return inj.kind
        return None

    def _arm_veto(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Let the detectors veto this step's update from inside the optimizer, where the global gradient norm
        is known (DeepSpeed computes it there for ZeRO-1/2/3 and bf16) and nothing has changed yet."""
        self._epoch_before = self.engine.lr_scheduler.last_epoch

        def gate() -> bool:
            gn = grad_norm if grad_norm is not None else getattr(self.engine.optimizer, "_global_grad_norm", None)
            self._verdict = self.spikes.judge(step, loss, None if gn is None else float(gn))
            return self._verdict.applied

        self.engine.client_optimizer.gate = gate

    def _disarm_veto(self, step: int, loss: float) -> Verdict:
        answer = self.engine.client_optimizer.reset_gate()
        if answer is None:  # the optimizer never ran: DeepSpeed skipped the step itself (non-finite gradients)
            verdict = self.spikes.judge(step, loss, self.engine.get_global_grad_norm())
            verdict.applied = False
            return verdict
        if not answer:  # vetoed: DeepSpeed still stepped the LR schedule, which must not advance
            rewind_scheduler(self.engine.lr_scheduler, self._epoch_before)
        return self._verdict

    @torch.no_grad()
    def evaluate(self) -> dict:
        t = self.cfg.trainer
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        per_batch = t.micro_batch_size * self.world
        for b in range(t.eval_batches):
            first = b * per_batch + self.rank * t.micro_batch_size
            ids = torch.arange(first, first + t.micro_batch_size).numpy() % len(self.val_data)
            batch = self.val_data.get(ids).to(self.engine.device)
            total += self.engine(batch[:, :-1], batch[:, 1:], **self.data.model_kwargs(batch)).float()
        if self.world > 1:
            dist.all_reduce(total)
        self.engine.train()
        val_loss = float(total) / (t.eval_batches * self.world)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}

    def save(self) -> None:
        self._refuse_nonfinite_state()
        state = {"step": self.step, "samples_consumed": self.loader.samples_consumed, "world_size": self.world,
                 "spike_monitor": self.spikes.state_dict(), "skip_batches": self.skips.ranges,
                 "rollbacks": self.rollbacks}
        rank_state = ({"local_experts": self.expert_parallel.local_state(self.engine.optimizer)}
                      if self.expert_parallel is not None else {})
        tag_dir = checkpoint.save(self.engine, self.run_dir / "checkpoints", self.step, state,
                                  self.cfg.trainer.keep_checkpoints, rank_state)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step, tag_dir)

    def _refuse_nonfinite_state(self) -> None:
        """Collective. A checkpoint never stores NaN/Inf: raise (one line, an event; older checkpoints stay)."""
        where = first_nonfinite(self.model, self.engine.client_optimizer)
        bad = torch.tensor(float(where is not None), device=self.device)
        if self.world > 1:
            dist.all_reduce(bad)
        if not bad.item():
            return
        where = where or "a tensor on another rank"
        intact = [d.name for d, r in checkpoint.candidates(self.run_dir / "checkpoints") if r is None]
        self.logger.event("checkpoint_refused", self.step, reason=f"{where} holds NaN/Inf")
        raise StableTrainError(f"step {self.step}: {where} holds NaN/Inf; refusing to write a checkpoint "
                               f"(newest intact one: {intact[0] if intact else 'none'}; continue from it with "
                               "trainer.resume=auto, optionally with trainer.skip_batches)")

    # ---------------------------------------------------------------- loop
    def fit(self) -> float:
        t = self.cfg.trainer
        last = t.stop_at or t.max_steps
        self._say(f"model: {self.n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
                  f"{self.world} rank(s), global batch {self.loader.global_batch_size}×{self.cfg.data.seq_len} tokens; "
                  f"MFU peak: {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=last, initial=self.step, disable=not (self.is_main and self.cfg.logging.progress),
                   dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
        val = None
        try:
            if self.step == 0:
                val = self._eval_and_log()
            while self.step < last and self.stop_signal is None:
                for cb in self.callbacks:
                    cb.on_step_begin(self, self.step + 1)
                metrics = self.train_step()
                verdict = self.last_step[0]
                if (verdict.fired or not verdict.applied) and self._respond(verdict) == "rollback":
                    bar.n = self.step
                    bar.refresh()
                    continue
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, metrics)
                if self.step % t.log_interval == 0 or self.step == last or any(k.startswith("gain/") for k in metrics):
                    self.logger.log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == last:
                    val = self._eval_and_log()
                if (t.ckpt_interval and self.step % t.ckpt_interval == 0) or self.step == last or self.stop_signal:
                    self.save()
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stop_signal:
            self._say(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; checkpoint "
                      f"{checkpoint.tag_for(self.step)} saved (continue with trainer.resume=auto)")
            return float("nan")
        return val["val_loss"] if val else float("nan")

    # ---------------------------------------------------------------- spike responses
    def _respond(self, verdict: Verdict) -> str:
        """Record a firing (events, W&B alert, forensics) and carry out its response; returns the response."""
        from stabletrain.monitoring.forensics import investigate

        mon, (_, batch_index, batches) = self.cfg.monitor, self.last_step
        if any(f["kind"] == "nonfinite" for f in verdict.firings):
            self._refuse_nonfinite_state()  # NaN weights (e.g. loaded ones): no step can recover, stop now
        for f in verdict.firings:
            fields = {k: v for k, v in f.items() if k != "kind"}
            self.logger.event(f["kind"], verdict.step, response=verdict.response, batch=batch_index, **fields)
            threshold = f" > {f['threshold']:.4g}" if "threshold" in f else ""
            self.logger.alert(f"stabletrain: {f['kind']} in {f['metric']}",
                              f"step {verdict.step}: {f['metric']}={f['value']:.4g}{threshold} ({f['rule']}); "
                              f"response: {verdict.response}", mon.alert_interval_s)
        if verdict.fired and mon.forensics:
            report = investigate(self, verdict, batch_index, batches)
            if report is not None:
                self.logger.event("forensics", verdict.step, report=str(report["path"]), cause=report["cause"])
                self._say(f"step {verdict.step}: {verdict.firings[0]['kind']} ({report['cause']}); "
                          f"forensics in {report['path']}")
        if not verdict.fired:  # DeepSpeed dropped the update itself (its overflow check)
            self.logger.event("skip_step", verdict.step, reason="DeepSpeed skipped the update (non-finite gradients)")
        elif verdict.response == "skip_step":
            self.logger.event("skip_step", verdict.step, reason=verdict.firings[0]["kind"])
        elif verdict.response == "rollback":
            return "rollback" if self._rollback(verdict, batch_index) else "skip_step"
        elif verdict.response == "stop":
            self._stop(verdict, "monitor response 'stop'")
        return verdict.response if verdict.fired else "skip_step"

    def _rollback(self, verdict: Verdict, batch_index: int) -> bool:
        """Restore the newest complete checkpoint and skip the data around the spike (PaLM's remedy); False when
        there is no checkpoint yet (the update was vetoed, so that is a skipped step)."""
        mon = self.cfg.monitor
        recent = [s for s in self.rollbacks if s > verdict.step - mon.rollback_window]
        if len(recent) >= mon.max_rollbacks:
            self._stop(verdict, f"{len(recent)} rollbacks within {mon.rollback_window} steps (monitor.max_rollbacks)")
        good = [d for d, reason in checkpoint.candidates(self.run_dir / "checkpoints") if reason is None]
        for tag_dir in list(good):
            rejection = checkpoint.verify(tag_dir)
            if rejection is None:
                break
            self.logger.event("checkpoint_rejected", verdict.step, checkpoint=str(tag_dir), file=rejection.file,
                              reason=rejection.reason)
            good.remove(tag_dir)
        if not good:
            self.logger.event("skip_step", verdict.step, reason="rollback requested but no intact checkpoint")
            return False
        skip = [max(0, batch_index - mon.rollback_skip_batches + 1), batch_index + 1] if mon.rollback_skip_batches else None
        if skip:
            self.skips.add(*skip)
        self.rollbacks.append(verdict.step)
        ranges, rollbacks = list(self.skips.ranges), list(self.rollbacks)
        reason = self._try_load(good[0])
        if reason is not None:
            raise StableTrainError(f"rollback at step {verdict.step} could not load {good[0]}: {reason}")
        self.skips.merge(ranges)
        self.rollbacks = sorted(set(self.rollbacks) | set(rollbacks))
        for router in self.model.routers():  # the abandoned step's expert loads
            router.load.zero_()
        self.logger.rewind(self.step)
        self.logger.event("rollback", self.step, from_step=verdict.step, checkpoint=str(good[0]), skip_batches=skip)
        self._say(f"step {verdict.step}: rolled back to step {self.step} ({good[0].name}); skipping global batches "
                  f"{skip[0]}..{skip[1] - 1}" if skip else f"step {verdict.step}: rolled back to step {self.step}")
        return True

    def _stop(self, verdict: Verdict, why: str) -> None:
        self.save()  # the vetoed update never reached these weights
        self.logger.event("stop", verdict.step, reason=why)
        f = verdict.firings[0]
        raise StableTrainError(f"stopped at step {verdict.step} by {why}: {f['kind']} in {f['metric']} "
                               f"({f['value']:.4g}); checkpoint {checkpoint.tag_for(self.step)} holds the weights "
                               f"before that update (continue with trainer.resume=auto, optionally with "
                               f"trainer.skip_batches=[[{self.last_step[1]},{self.last_step[1] + 1}]])")

    def _eval_and_log(self) -> dict:
        for cb in self.callbacks:
            cb.on_eval_begin(self, self.step)
        val = self.evaluate()
        for cb in self.callbacks:
            cb.on_eval_end(self, self.step, val)
        self.logger.log({"step": self.step, **val})
        self._say(f"step {self.step}: val_loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})")
        return val

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM/SIGINT: stop at the end of the current step after a checkpoint; a second Ctrl-C aborts now."""
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.stop_signal is None:
            self.stop_signal = signum
            self._say(f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then a checkpoint and stop"
                      + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""))

    def _say(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        self.logger.close()


def default_callbacks(cfg: Config) -> list[Callback]:
    from stabletrain.monitoring.gains import GainMonitor
    from stabletrain.training.callbacks import MoEBalance, SignalScalarSync

    callbacks: list[Callback] = [GainMonitor(cfg.monitor.gain_interval)]
    if cfg.model.signal_scaling == "bslo":
        callbacks.append(SignalScalarSync())
    if cfg.model.ffn.kind == "moe":
        callbacks.append(MoEBalance())
    return callbacks
