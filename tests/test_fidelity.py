"""Fidelity to the papers (issue 11 audit): stream counts, where gains are measured, the sequence-wise balance
loss, the DeepSeek-V3 settings of the mHC presets, init with LayerNorm Scaling, and the spike rules."""

import math

import pytest
import torch

from stabletrain.analysis.spike_rules import fired_steps, score, synthetic_trace
from stabletrain.config import ModelConfig
from stabletrain.models import Transformer
from stabletrain.models.moe import AuxFreeRouter
from stabletrain.monitoring.gains import GainMonitor
from tests.helpers import composed, moe_config, one_rank_trainer, residual_config


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_hc_and_mhc_default_to_the_papers_four_streams(kind):
    cfg = composed(f"model/residual={kind}").model  # on the baseline preset, which sets no stream count
    cfg.vocab_size = 64
    model = Transformer(cfg)
    assert cfg.residual.streams == 4 and model.stream.streams == 4
    assert composed(f"model/residual={kind}", "model.residual.streams=2").model.residual.streams == 2
    assert composed().model.residual.streams == 1


def test_all_gains_of_a_step_come_from_its_first_micro_batch():
    """With gradient accumulation the composite Amax gain is taken from the same (first) micro-batch as the
    per-block gains, not overwritten by the last one."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=64, d_model=32, n_layers=2, n_heads=4, residual=residual_config("hc", streams=4, gate_init=1.0)
        )
    )
    with torch.no_grad():  # dynamic coefficients that differ between inputs
        for c in model.connections():
            c.W.normal_(std=1.0)
    first, second = (torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    trainer = one_rank_trainer(model)
    monitor = GainMonitor(interval=1)
    monitor.on_step_begin(trainer, 1)
    model(first).sum().backward()
    mats_first = [c.last_mix.clone() for c in model.connections()]
    model(second).sum().backward()
    metrics = {}
    monitor.on_step_end(trainer, 1, metrics)
    from stabletrain.monitoring.gains import amax_gains

    fwd, _ = amax_gains(mats_first)
    assert metrics["gain/amax_fwd_max"] == pytest.approx(max(fwd), rel=1e-12)
    # and the second micro-batch alone would have given another value
    for c in model.connections():
        c.record, c.last_mix = True, None
    model(second)
    other, _ = amax_gains([c.last_mix for c in model.connections()])
    assert max(other) != pytest.approx(max(fwd), rel=1e-6)


def test_sequence_balance_loss_counts_the_unbiased_top_k():
    """DeepSeek-V3: f_i counts expert i in the top-k of the raw affinities; the balancing bias only selects."""
    torch.manual_seed(0)
    router = AuxFreeRouter(16, moe_config(n_routed=4, top_k=1, seq_aux_coef=1.0)).train()
    router.bias[3] = 10.0  # the bias alone sends every token to expert 3
    x = torch.randn(2, 5, 16)
    idx, _ = router(x)
    assert (idx == 3).all()
    scores = torch.sigmoid(x @ router.weight.T)
    unbiased = scores.topk(1, dim=-1).indices
    assert not (unbiased == 3).all()
    chosen = torch.zeros_like(scores).scatter_(-1, unbiased, 1.0)
    f = chosen.sum(-2) * 4 / (1 * 5)
    p = (scores / scores.sum(-1, keepdim=True)).mean(-2)
    assert router.aux_loss.item() == pytest.approx((f * p).sum(-1).mean().item(), rel=1e-6)
    biased = AuxFreeRouter(16, moe_config(n_routed=4, top_k=1, seq_aux_coef=1.0, seq_aux_indicator="biased")).train()
    biased.load_state_dict(router.state_dict())
    biased(x)
    assert biased.aux_loss.item() != pytest.approx(router.aux_loss.item())


@pytest.mark.parametrize("size", ["3b", "9b", "27b"])
@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_mhc_paper_presets_take_deepseek_v3_values_where_the_paper_is_silent(size, variant):
    m = composed(f"model={variant}_{size}").model
    e, r = m.ffn, m.ffn.router
    assert (r.kind, r.seq_aux_coef, r.route_scale, r.n_groups, r.topk_groups, e.first_dense) == (
        "aux_free",
        1e-4,
        2.5,
        8,
        4,
        3,
    )
    assert (r.bias_update_rate, e.top_k, e.n_shared, r.seq_aux_indicator) == (1e-3, 6, 2, "unbiased")
    assert m.init_std == 0.006 and m.vocab_size == 129280


def test_layernorm_scaling_gets_the_plain_init_unless_set():
    def out_std(*overrides):
        cfg = composed(*overrides).model
        cfg.vocab_size = 64
        model = Transformer(cfg)
        return model.blocks[0].attn.o_proj.weight.std().item(), cfg

    d = 512  # large enough for the sample std to separate 0.02 from 0.02 / sqrt(2L)
    plain, cfg = out_std("model.norm.depth_scaling=lns", f"model.d_model={d}", "model.n_layers=8")
    assert cfg.out_proj_init == "plain" and plain == pytest.approx(0.02, rel=0.05)
    scaled, cfg = out_std(f"model.d_model={d}", "model.n_layers=8")
    assert cfg.out_proj_init == "scaled" and scaled == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    forced, cfg = out_std(
        "model.norm.depth_scaling=lns", "model.residual_init=scaled", f"model.d_model={d}", "model.n_layers=8"
    )
    assert cfg.out_proj_init == "scaled" and forced == pytest.approx(scaled, rel=0.05)


def test_spike_rules_on_the_synthetic_trace():
    """The comparison in docs/spikes.md: which known events each rule catches."""
    loss, grad, events = synthetic_trace()
    ours = score(fired_steps(loss, grad, "stabletrain"), events)
    olmo = score(fired_steps(loss, grad, "olmo_core"), events)
    by_name = {e.name: e for e in events}
    burst = next(n for n in by_name if n.startswith("burst"))
    drop = next(n for n in by_name if by_name[n].harmless)
    jump2 = next(n for n in by_name if "x2" in n)
    assert ours["hits"][burst] == 10 and olmo["hits"][burst] < 10  # spikes kept out of our window
    assert ours["hits"][drop] == 0 and olmo["hits"][drop] > 0  # one-sided: a falling loss is not a spike
    assert ours["hits"][jump2] == 0 and olmo["hits"][jump2] == 1  # our 3x floor lets a 2x norm jump pass
    for name in by_name:
        if "x1.5" in name or "x10" in name or "x4" in name:
            assert ours["hits"][name] == olmo["hits"][name] == 1, name
    assert ours["false_alarms"] == olmo["false_alarms"] == []
