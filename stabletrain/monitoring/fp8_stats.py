"""`fp8/*` metrics: every monitor.gain_interval steps (and at step 1), what FP8 quantization did during the real
training step: the fraction of values clamped at +-448 (saturated) and of non-zero values that became zero
(underflow) per layer type (attn, mlp, expert), the smallest and largest scale, and each layer type's first forward
GEMM against the same product in bf16 (relative Frobenius error); and fp8/coverage, the share of the block Linears'
weights whose GEMMs run in FP8 (1.0 unless precision.fp8.min_coverage allows less)."""

from __future__ import annotations

from stabletrain.parallel import fp8
from stabletrain.training.callbacks import CALLBACKS, Callback


@CALLBACKS.register("fp8")
class FP8Monitor(Callback):
    @classmethod
    def build(cls, trainer) -> FP8Monitor | None:
        f, interval = trainer.cfg.precision.fp8, trainer.cfg.monitor.gain_interval
        # torchao's kernels are opaque: its runs report coverage only.
        return cls(interval, str(f.backend) != "torchao", trainer.parallel.fp8.coverage) if f.enabled else None

    def __init__(self, interval: int, statistics: bool, coverage: float):
        self.interval, self.statistics, self.coverage = interval, statistics, coverage

    def _due(self, step: int) -> bool:
        return step == 1 or bool(self.interval and step % self.interval == 0)

    def on_step_begin(self, trainer, step: int) -> None:
        if self.statistics and self._due(step):
            fp8.STATS.reset()
            fp8.STATS.active = True

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self._due(step):
            metrics["fp8/coverage"] = self.coverage
        if not fp8.STATS.active:
            return
        fp8.STATS.active = False
        s = fp8.STATS
        parts = trainer.engine.stage_gather((dict(s.counts), s.scale_min, s.scale_max, s.gemm_rel_err))
        if parts is None:  # not rank 0; every rank took part in the gather (pipeline stages hold different layers)
            return
        merged = fp8.Stats()
        for counts, lo, hi, errs in parts:
            for kind, c in counts.items():
                merged.counts[kind] = [a + b for a, b in zip(merged.counts[kind], c)]
            merged.scale_min, merged.scale_max = min(merged.scale_min, lo), max(merged.scale_max, hi)
            merged.gemm_rel_err.update(errs)
        metrics.update(merged.metrics())
