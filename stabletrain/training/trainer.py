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
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from stabletrain import StableTrainError
from stabletrain.config import Config, to_object, validate
from stabletrain.data.dataset import GlobalOrder, PackedSequences, RankLoader
from stabletrain.data.setup import prepare_data
from stabletrain.engine import distributed as dist_utils
from stabletrain.engine.deepspeed_engine import build_engine, clips_in_engine
from stabletrain.engine.expert_parallel import ExpertParallel
from stabletrain.models import build_model, flops_per_token, param_count
from stabletrain.monitoring.sinks import MetricsLogger, NullLogger
from stabletrain.training import checkpoint
from stabletrain.training.perf import peak_flops


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

        data = prepare_data(cfg.data, self.is_main)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = data.tokenizer.vocab_size
        elif cfg.model.vocab_size < data.tokenizer.vocab_size:
            raise StableTrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                   f"{data.tokenizer.vocab_size}")
        self.train_data = PackedSequences(data.train_tokens, cfg.data.seq_len)
        self.val_data = PackedSequences(data.val_tokens, cfg.data.seq_len)
        for name, d in (("train", self.train_data), ("val", self.val_data)):
            if len(d) == 0:
                raise StableTrainError(f"the {name} split has fewer than data.seq_len+1={cfg.data.seq_len + 1} tokens")
        self.loader = RankLoader(self.train_data, GlobalOrder(len(self.train_data), t.seed), t.micro_batch_size,
                                 t.grad_accum_steps, self.rank, self.world)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model)
        self.expert_parallel = (ExpertParallel(self.model, cfg.engine.expert_parallel, self.world, self.rank)
                                if cfg.engine.expert_parallel > 1 else None)
        self.n_params = param_count(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.engine = build_engine(cfg, self.model, self.world)
        if self.expert_parallel is not None:
            self.expert_parallel.restore_experts()
        self.step = 0

        resume_events = self._resume()
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            self.logger = MetricsLogger(cfg, run_dir, resolved, self.step if resume_events else None)
        else:
            self.logger = NullLogger()
        for kind, fields in resume_events:
            self.logger.event(kind, self.step, **fields)
        self.peak, self.peak_source = peak_flops(self.device, cfg.precision.dtype, t.peak_tflops)
        self.callbacks: list[Callback] = default_callbacks(cfg)
        self._stop_requested = False

    # ---------------------------------------------------------------- resume
    def _resume(self) -> list[tuple[str, dict]]:
        """Load the checkpoint trainer.resume points at; return the events to record."""
        mode = self.cfg.trainer.resume
        if mode == "none":
            if checkpoint.candidates(self.run_dir / "checkpoints"):
                # Training from scratch here would interleave two runs' metrics and prune the old checkpoints.
                raise StableTrainError(f"{self.run_dir} already holds checkpoints: pass trainer.resume=auto to "
                                       "continue that run, or choose another hydra.run.dir")
            return []
        root = self.run_dir / "checkpoints" if mode == "auto" else Path(mode)
        if checkpoint.TAG_RE.match(root.name):  # a tag directory was given: search its parent, newest first
            root = root.parent
        rejected: list[list[str]] = []
        for tag_dir, reason in checkpoint.candidates(root):
            if reason is None:
                reason = self._try_load(tag_dir)
            if reason is None:
                self._say(f"resumed from {tag_dir} at step {self.step}")
                return [("resume", {"checkpoint": str(tag_dir), "rejected": rejected})]
            self._say(f"resume: skipping checkpoint {tag_dir.name}: {reason}")
            rejected.append([tag_dir.name, reason])
        if any(r.startswith("unreadable") for _, r in rejected):
            # A failed load may have left half-restored state behind: do not train from it.
            raise StableTrainError(f"no checkpoint in {root} could be loaded ({'; '.join(': '.join(r) for r in rejected)})")
        self._say(f"resume={mode}: no complete checkpoint in {root}; starting fresh")
        return [("resume", {"checkpoint": None, "rejected": rejected})]

    def _try_load(self, tag_dir: Path) -> str | None:
        """Load a complete-looking checkpoint on every rank; the reason it failed on any rank, or None."""
        reason = None
        try:
            state = checkpoint.load(self.engine, tag_dir)
            if self.expert_parallel is not None:
                self.expert_parallel.load_local_state(checkpoint.load_rank_state(tag_dir)["local_experts"],
                                                      self.engine.optimizer)
            self.step = int(state["step"])
            self.loader.samples_consumed = int(state["samples_consumed"])
        except Exception as e:  # a corrupt file surfaces as whatever torch/DeepSpeed raise while reading it
            reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        failed = torch.tensor(float(reason is not None), device=self.device)
        if self.world > 1:
            dist.all_reduce(failed)
        if failed.item() and reason is None:
            reason = "unreadable on another rank"
        if reason is not None:
            self.step, self.loader.samples_consumed = 0, 0
        return reason

    # ---------------------------------------------------------------- steps
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for i, batch in enumerate(self.loader.next_batch()):
            batch = batch.to(self.engine.device, non_blocking=True)
            loss = self.engine(batch[:, :-1], batch[:, 1:])
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if i == self.cfg.trainer.grad_accum_steps - 1 and not clips_in_engine(self.cfg):
                clip = self.cfg.optim.grad_clip or math.inf
                if self.expert_parallel is not None:
                    self.expert_parallel.reduce_gradients()
                    grad_norm = self.expert_parallel.clip_grad_norm_(clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        # One all-reduce carries the mean loss and any rank's stop request.
        packed = torch.stack([loss_sum / self.cfg.trainer.grad_accum_steps,
                              torch.tensor(float(self._stop_requested), device=loss_sum.device)])
        if self.world > 1:
            dist.all_reduce(packed)
            packed[0] /= self.world
        self._stop_requested = bool(packed[1] > 0)
        self.step += 1
        elapsed = time.perf_counter() - t0
        tokens = self.loader.global_batch_size * self.cfg.data.seq_len
        tps = tokens / elapsed
        return {"step": self.step, "tokens": self.loader.samples_consumed * self.cfg.data.seq_len,
                "samples": self.loader.samples_consumed, "loss": float(packed[0]),
                "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tps, "mfu": self.flops_per_token * tps / (self.peak * self.world),
                "step_time_s": elapsed}

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
            total += self.engine(batch[:, :-1], batch[:, 1:]).float()
        if self.world > 1:
            dist.all_reduce(total)
        self.engine.train()
        val_loss = float(total) / (t.eval_batches * self.world)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}

    def save(self) -> None:
        state = {"step": self.step, "samples_consumed": self.loader.samples_consumed, "world_size": self.world}
        rank_state = ({"local_experts": self.expert_parallel.local_state(self.engine.optimizer)}
                      if self.expert_parallel is not None else {})
        tag_dir = checkpoint.save(self.engine, self.run_dir / "checkpoints", self.step, state,
                                  self.cfg.trainer.keep_checkpoints, rank_state)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step, tag_dir)

    # ---------------------------------------------------------------- loop
    def fit(self) -> float:
        t = self.cfg.trainer
        last = t.stop_at or t.max_steps
        self._say(f"model: {self.n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
                  f"{self.world} rank(s), global batch {self.loader.global_batch_size}×{self.cfg.data.seq_len} tokens; "
                  f"MFU peak: {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=last, initial=self.step, disable=not (self.is_main and self.cfg.logging.progress),
                   dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
        val = None
        try:
            if self.step == 0:
                val = self._eval_and_log()
            while self.step < last and not self._stop_requested:
                for cb in self.callbacks:
                    cb.on_step_begin(self, self.step + 1)
                metrics = self.train_step()
                if not math.isfinite(metrics["loss"]):
                    self.logger.event("nonfinite", self.step, value=metrics["loss"])
                    raise StableTrainError(f"non-finite loss at step {self.step}; the newest checkpoint in "
                                           f"{self.run_dir / 'checkpoints'} holds finite weights")
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, metrics)
                if self.step % t.log_interval == 0 or self.step == last or any(k.startswith("gain/") for k in metrics):
                    self.logger.log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == last:
                    val = self._eval_and_log()
                if (t.ckpt_interval and self.step % t.ckpt_interval == 0) or self.step == last or self._stop_requested:
                    self.save()
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        if self._stop_requested:
            self._say(f"stopped on SIGTERM at step {self.step} after saving a checkpoint")
        return val["val_loss"] if val else float("nan")

    def _eval_and_log(self) -> dict:
        for cb in self.callbacks:
            cb.on_eval_begin(self, self.step)
        val = self.evaluate()
        for cb in self.callbacks:
            cb.on_eval_end(self, self.step, val)
        self.logger.log({"step": self.step, **val})
        self._say(f"step {self.step}: val_loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})")
        return val

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True  # acted on at the end of the current step: checkpoint, then stop

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
    if cfg.model.ffn == "moe":
        callbacks.append(MoEBalance())
    return callbacks


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train from a composed config; user errors become one line on stderr and exit status 2."""
    try:
        typed = to_object(cfg)
        validate(typed)
        if typed.trainer.plan:
            from stabletrain.training.plan import print_plan

            print_plan(typed)
            return float("nan")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        trainer = Trainer(typed, run_dir, resolved)
        try:
            val_loss = trainer.fit()
        finally:
            trainer.close()
        if trainer.is_main:
            print(f"final val_loss {val_loss:.4f}; run directory: {run_dir}")
        return val_loss
    except StableTrainError as e:
        print(f"stabletrain: error: {e}", file=sys.stderr)
        sys.exit(2)
