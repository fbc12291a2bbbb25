"""Fidelity to the papers (issue 11 and 25 audits): stream counts, where and how gains are measured, the
sequence-wise balance loss, the mHC presets against the paper's Table 5 (settings and sizes) and DeepSeek-V3, every
model preset plans, HC's sqrt(n) output init, init with LayerNorm Scaling, and the spike rules."""

import math

import pytest
import torch

from stabletrain.analysis.spike_rules import fired_steps, score, synthetic_trace
from stabletrain.config import ModelConfig, validate
from stabletrain.models import Transformer, param_count
from stabletrain.models.moe import AuxFreeRouter
from stabletrain.monitoring.gains import GainMonitor, amax_fwd_from_input, amax_gains, amax_metrics
from stabletrain.planner.report import plan
from tests.helpers import REPO, composed, moe_config, one_rank_trainer, residual_config


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


# The mHC paper's Table 5: layers, hidden, heads, routed experts, their width; total parameters and active ones
# without the embedding table (the output head counted).
TABLE_5 = {"3b": (12, 1280, 16, 64, 896, 2.97e9, 612e6), "9b": (18, 1920, 24, 64, 1280, 9.18e9, 1.66e9),
           "27b": (30, 2560, 32, 72, 1536, 27.0e9, 4.14e9)}  # fmt: skip


@pytest.mark.parametrize("size", ["3b", "9b", "27b"])
@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_mhc_paper_presets_take_table_5s_values_and_sizes(size, variant):
    m = composed(f"model={variant}_{size}").model
    layers, hidden, heads, routed, width, total, active = TABLE_5[size]
    e, a = m.ffn, m.attention
    assert (m.n_layers, m.d_model, m.n_heads, e.n_routed, e.expert_hidden) == (layers, hidden, heads, routed, width)
    assert (e.first_dense, e.top_k, e.n_shared, m.vocab_size, m.norm_eps, m.rope_theta) == (1, 6, 2, 129280, 1e-20, 1e4)
    assert (m.attention.kind, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim) == ("mla", 512, 64, 128)
    assert a.v_head_dim == 128  # Table 5's "Attention Dimension"
    assert not m.tie_embeddings  # Table 5's vocabulary parameters are two tables: 331M = 2 x 129280 x 1280
    if variant != "baseline":
        assert (m.residual.streams, m.residual.gate_init) == (4, 0.01)
    if variant == "mhc":
        assert (m.residual.sinkhorn_iters, m.residual.norm_eps) == (20, 1e-20)
    assert param_count(m) == pytest.approx(total, rel=5e-3)
    assert param_count(m, active=True) - m.vocab_size * m.d_model == pytest.approx(active, rel=5e-3)


@pytest.mark.parametrize("size", ["3b", "9b", "27b"])
@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_mhc_paper_presets_take_deepseek_v3_values_where_the_paper_is_silent(size, variant):
    m = composed(f"model={variant}_{size}").model
    e, r = m.ffn, m.ffn.router
    assert (r.kind, r.seq_aux_coef, r.route_scale, r.n_groups, r.topk_groups) == ("aux_free", 1e-4, 2.5, 8, 4)
    assert (r.bias_update_rate, r.seq_aux_indicator) == (1e-3, "unbiased")
    assert m.init_std == 0.006 and e.hidden == 8 * e.expert_hidden  # the dense layer: (6 + 2) experts' width


PRESETS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_composes_and_plans(preset):
    """What `python train.py model=<preset> trainer.plan=true` does, in this process: compose, check, plan."""
    cfg = composed(f"model={preset}", "trainer.plan=true")
    validate(cfg)
    report = plan(cfg)
    assert report["total_params"] >= report["active_params"] > 0 and report["considered"] > 0
    assert report["configured"].total_gib > 0


def test_hc_output_projections_start_sqrt_n_wider():
    """The HC paper's sqrt(n) on the init std of the attention and MLP output projections (x2 at n = 4);
    model.residual.out_init_sqrt_n=false turns it off; other weights and the other streams are unchanged."""

    def stds(*overrides):
        cfg = composed("model.d_model=512", "model.n_layers=8", "model.vocab_size=64", *overrides).model
        block = Transformer(cfg).blocks[0]
        return [w.std().item() for w in (block.attn.o_proj.weight, block.mlp.w_down.weight, block.attn.q_proj.weight)]

    scaled = 0.02 / math.sqrt(16)  # the baseline's depth-scaled output std (2L = 16)
    o, down, q = stds("model=hc")
    assert o == pytest.approx(2 * scaled, rel=0.05) and down == pytest.approx(2 * scaled, rel=0.05)
    assert q == pytest.approx(0.02, rel=0.05)
    o, down, _ = stds("model=hc", "model.residual.out_init_sqrt_n=false")
    assert o == pytest.approx(scaled, rel=0.05) and down == pytest.approx(scaled, rel=0.05)
    o, _, _ = stds("model=hc", "model.residual.streams=2")
    assert o == pytest.approx(math.sqrt(2) * scaled, rel=0.05)
    for preset in ("baseline", "mhc"):
        assert stds(f"model={preset}")[0] == pytest.approx(scaled, rel=0.05)


def test_amax_gains_take_both_directions_from_the_same_composite():
    """Three sublayers with mixing matrices A, B, C (x_{k+1} = M_k x_k). The paper's composite at sublayer k is the
    product from k to the top, P_k = M_3 ... M_k:
        P_1 = C B A = [[2, 2], [2, 3]]    rows 4, 5    columns 4, 5
        P_2 = C B   = [[2, 0], [2, 1]]    rows 2, 3    columns 4, 1
        P_3 = C     = [[1, 0], [1, 1]]    rows 1, 2    columns 2, 1
    so the forward gains (max |row sum|) are 5, 3, 2 and the backward ones (max |column sum|) 5, 4, 2. The product
    from the input, M_k ... M_1 = A, B A = [[2, 2], [0, 1]], C B A, has max row sums 2, 4, 5."""
    A = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    B = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    C = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert amax_gains([A, B, C]) == ([5.0, 3.0, 2.0], [5.0, 4.0, 2.0])
    assert amax_fwd_from_input([A, B, C]) == [2.0, 4.0, 5.0]
    m = amax_metrics([A, B, C])
    assert [m[f"gain/amax_fwd/{k}"] for k in (1, 2, 3)] == [5.0, 3.0, 2.0] and m["gain/amax_fwd_max"] == 5.0
    assert [m[f"gain/amax_bwd/{k}"] for k in (1, 2, 3)] == [5.0, 4.0, 2.0] and m["gain/amax_bwd_max"] == 5.0
    assert [m[f"gain/amax_fwd_from_input/{k}"] for k in (1, 2, 3)] == [2.0, 4.0, 5.0]
    assert m["gain/amax_fwd_from_input_max"] == 5.0 and amax_metrics([]) == {}


def test_layernorm_scaling_gets_the_plain_init_unless_set():
    def out_std(*overrides):
        cfg = composed(*overrides).model
        cfg.vocab_size = 64
        model = Transformer(cfg)
        return model.blocks[0].attn.o_proj.weight.std().item(), cfg

    d = 512  # large enough for the sample std to separate 0.02 from 0.02 / sqrt(2L)
    plain, cfg = out_std("model/norm=lns", f"model.d_model={d}", "model.n_layers=8")
    assert cfg.out_proj_init == "plain" and plain == pytest.approx(0.02, rel=0.05)
    scaled, cfg = out_std(f"model.d_model={d}", "model.n_layers=8")
    assert cfg.out_proj_init == "scaled" and scaled == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    forced, cfg = out_std("model/norm=lns", "model.residual_init=scaled", f"model.d_model={d}", "model.n_layers=8")
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
