"""Activation checkpointing (engine.activation_checkpointing): the same losses and gradients as no recomputation
for every residual variant, side effects of the forward (router loads, BSLO EMAs) counted once, and diagnostics
unchanged."""

import pytest
import torch

from stabletrain.monitoring.gains import GainMonitor
from stabletrain.parallel.recompute import CheckpointedBlocks, apply_activation_checkpointing
from tests.helpers import composed, one_rank_trainer

VARIANTS = {
    "baseline": [],
    "hc": ["model=hc"],
    "mhc": ["model=mhc"],
    "mhc_fused": ["model=mhc", "model.residual.kernel=fused"],
    "lns": ["model/norm=lns"],
    "moe": ["model=moe", "model.ffn.n_routed=4", "model.ffn.expert_hidden=32", "model.ffn.top_k=2"],
    "bslo": ["model/signal=bslo", "model.signal.warmup_steps=0"],
}
SMALL = ["model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.vocab_size=97"]


def _model(overrides, mode="none", blocks=1):
    from stabletrain.models import build_model

    cfg = composed(*SMALL, *overrides, f"engine.activation_checkpointing={mode}",
                   f"engine.activation_checkpointing_blocks={blocks}")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_activation_checkpointing(model, cfg)
    return model


def _run(model, steps=2):
    """Two forward/backward passes (the second sees the first's side effects); losses, gradients, buffers."""
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 97, (2, 16), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads, {n: b.clone() for n, b in model.named_buffers()}


# The fused kernels compile in the worker that compiled them for test_residual (same shapes): ~40 s once, not twice.
INDUCTOR = pytest.mark.xdist_group("inductor")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=INDUCTOR) if v == "mhc_fused" else v for v in VARIANTS])
@pytest.mark.parametrize("mode, blocks", [("block", 1), ("block", 3), ("selective", 1)])
def test_recomputation_gives_the_same_losses_and_gradients(variant, mode, blocks):
    plain = _model(VARIANTS[variant])
    ours = _model(VARIANTS[variant], mode, blocks)
    assert isinstance(ours.run_blocks, CheckpointedBlocks) and ours.run_blocks.segment == blocks
    loss_a, grads_a, buffers_a = _run(plain)
    loss_b, grads_b, buffers_b = _run(ours)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-9, msg=name)
    for name in buffers_a:  # router loads and BSLO running norms: updated once per forward, not twice
        torch.testing.assert_close(buffers_b[name], buffers_a[name], rtol=1e-6, atol=0, msg=name)


def test_segment_auto_is_the_mhc_optimum():
    from stabletrain.config import checkpoint_segment

    cfg = composed("model=mhc", "model.n_layers=30", "engine.activation_checkpointing=block",
                   "engine.activation_checkpointing_blocks=0")  # fmt: skip
    assert checkpoint_segment(cfg) == round((4 * 30 / 6) ** 0.5)  # n=4, L=30: sqrt(20) -> 4
    cfg.engine.pipeline_stages = 2
    assert checkpoint_segment(cfg) == round((4 * 15 / 6) ** 0.5)  # per stage: 15 blocks -> 3


def test_gains_are_measured_the_same_under_recomputation():
    metrics = {}
    for mode in ("none", "block"):
        model = _model(VARIANTS["mhc"], mode, 2)
        monitor, trainer = GainMonitor(1), one_rank_trainer(model)
        monitor.on_step_begin(trainer, 1)
        idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
        model(idx[:, :-1], idx[:, 1:]).backward()
        monitor.on_step_end(trainer, 1, metrics.setdefault(mode, {}))
    assert metrics["none"].keys() == metrics["block"].keys() and "gain/grad/3" in metrics["none"]
    for key, value in metrics["none"].items():
        assert metrics["block"][key] == pytest.approx(value, rel=1e-5), key


def test_block_recomputation_keeps_only_segment_inputs():
    """Bytes kept for backward: block mode keeps each segment's input stream (the checkpoint's own hooks hold the
    rest until backward recomputes it); the per-process memory effect is measured in test_planner.py."""

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        idx = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return total

    sizes = {blocks: saved_bytes(_model(VARIANTS["mhc"], "block", blocks)) for blocks in (1, 2, 4)}
    plain = saved_bytes(_model(VARIANTS["mhc"]))
    stream = 4 * 63 * 4 * 32 * 4  # one [4, 63, n=4, C=32] fp32 stream
    # Besides what lies outside the blocks (embedding, head, loss), exactly one stream per segment is kept.
    assert sizes[1] - sizes[2] == 2 * stream and sizes[2] - sizes[4] == stream, sizes
    assert plain > 10 * sizes[1], (plain, sizes)
