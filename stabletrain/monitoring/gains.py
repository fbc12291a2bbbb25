"""Signal-propagation diagnostics as gains (gain/* metrics), measured on one micro-batch every N steps.

- gain/fwd/<l>:  forward gain of block l, mean token norm of its output stream over that of its input
- gain/grad/<l>: backward gain of block l, gradient norm at its input over that at its output
- gain/amax_fwd/<k>, gain/amax_bwd/<k> (HC/mHC, k = 1..2L sublayers): the mHC paper's "Amax gain magnitude" of the
  composite residual mapping from sublayer k to the top, P = M_2L ... M_k (its Eq. 4, Fig. 3 and 7): the largest
  absolute row sum of P (forward signal) and the largest absolute column sum of the same P (backward gradient),
  M_k being sublayer k's mixing matrix averaged over one sequence's tokens; gain/amax_fwd_max and
  gain/amax_bwd_max are the maxima over depth.
- gain/amax_fwd_from_input/<k>: the largest absolute row sum of the product from the input up to sublayer k,
  M_k ... M_1: how much the embedding's stream is amplified on its way to sublayer k (and its maximum).
Off-steps cost nothing: the model's probe slot is None and connections do not record.
"""

from __future__ import annotations

import torch

from stabletrain.models.residual import ResidualStream
from stabletrain.training.callbacks import CALLBACKS, Callback


def amax_gains(mats: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """The paper's forward and backward Amax gains at each sublayer k, both of the composite P_k = M_K ... M_k from
    k to the top (x_{k+1} = M_k x_k): one running product from the top down, in fp64."""
    fwd, bwd = [], []
    if mats:
        P = torch.eye(mats[0].shape[-1], dtype=torch.float64)
        for M in reversed(mats):
            P = P @ M.double()
            fwd.append(P.sum(1).abs().max().item())
            bwd.append(P.sum(0).abs().max().item())
    return fwd[::-1], bwd[::-1]


def amax_fwd_from_input(mats: list[torch.Tensor]) -> list[float]:
    """The largest absolute row sum of M_k ... M_1 at each sublayer k: the stream's gain from the input up to k."""
    out = []
    if mats:
        P = torch.eye(mats[0].shape[-1], dtype=torch.float64)
        for M in mats:
            P = M.double() @ P
            out.append(P.sum(1).abs().max().item())
    return out


def amax_metrics(mats: list[torch.Tensor]) -> dict[str, float]:
    """The gain/amax_* metrics of the sublayers' mixing matrices, in depth order."""
    if not mats:
        return {}
    fwd, bwd = amax_gains(mats)
    from_input = amax_fwd_from_input(mats)
    out = {}
    for name, values in (("amax_fwd", fwd), ("amax_bwd", bwd), ("amax_fwd_from_input", from_input)):
        out.update({f"gain/{name}/{k + 1}": v for k, v in enumerate(values)})
        out[f"gain/{name}_max"] = max(values)
    return out


class GainProbe:
    """Attached to model.probe: records stream norms at block boundaries of the first forward, and their grads."""

    def __init__(self, n_blocks: int):
        self.last = n_blocks
        self.norms: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}

    def observe(self, index: int, x: torch.Tensor) -> None:
        """The first observation of a boundary wins: the step's first micro-batch (later micro-batches, and a
        recomputation in backward, pass the same boundary again)."""
        if index in self.norms:
            return
        with torch.no_grad():
            self.norms[index] = ResidualStream.token_norms(x).mean().item()
        if x.requires_grad:
            x.register_hook(lambda g, i=index: self._grad(i, g))

    def _grad(self, index: int, g: torch.Tensor) -> None:
        if index not in self.grad_norms:
            self.grad_norms[index] = ResidualStream.token_norms(g).mean().item()

    def metrics(self) -> dict[str, float]:
        out = {}
        for l in range(self.last):
            if l in self.norms and l + 1 in self.norms:
                out[f"gain/fwd/{l}"] = self.norms[l + 1] / max(self.norms[l], 1e-30)
            if l in self.grad_norms and l + 1 in self.grad_norms:
                out[f"gain/grad/{l}"] = self.grad_norms[l] / max(self.grad_norms[l + 1], 1e-30)
        fwd = [v for k, v in out.items() if k.startswith("gain/fwd/")]
        if fwd:
            out["gain/fwd_max"] = max(fwd)
        return out


@CALLBACKS.register("gains")
class GainMonitor(Callback):
    """Every `interval` steps (and at step 1), measure gains during the real training step: no extra compute."""

    @classmethod
    def build(cls, trainer) -> "GainMonitor | None":
        interval = trainer.cfg.monitor.gain_interval
        return cls(interval) if interval else None

    def __init__(self, interval: int):
        self.interval = interval
        self.probe: GainProbe | None = None

    def on_step_begin(self, trainer, step: int) -> None:
        if not self.interval or not (step == 1 or step % self.interval == 0):
            return
        model = trainer.model
        self.probe = model.probe = GainProbe(len(model.blocks))
        for conn in model.connections():
            conn.record = True

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self.probe is None:
            return
        model = trainer.model
        mixes = {k: c.last_mix for k, c in enumerate(model.connections()) if c.last_mix is not None}
        # Pipeline stages each saw their own blocks: rank 0 assembles the whole depth.
        parts = trainer.engine.stage_gather((self.probe.norms, self.probe.grad_norms, mixes))
        model.probe = self.probe = None
        for conn in model.connections():
            conn.record, conn.last_mix = False, None
        if parts is None:
            return
        probe = GainProbe(len(model.blocks))
        for norms, grad_norms, part_mixes in parts:
            probe.norms.update(norms)
            probe.grad_norms.update(grad_norms)
            mixes.update(part_mixes)
        metrics.update(probe.metrics())
        metrics.update(amax_metrics([mixes[k] for k in sorted(mixes)]))
