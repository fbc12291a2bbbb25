"""Invariants of the residual-stream family (docs/methods.md §1, §2, §3, §6) and the gain diagnostics."""

import math

import pytest
import torch

from stabletrain.config import ModelConfig
from stabletrain.models import Transformer, param_count
from stabletrain.models.layers import rope_tables
from stabletrain.models.parts import LNSConfig
from stabletrain.models.residual.base import BSLOConfig, PropagationScalar
from stabletrain.models.residual.manifold import ManifoldConnection
from stabletrain.monitoring.gains import GainMonitor, GainProbe, amax_fwd_from_input, amax_gains
from tests.helpers import one_rank_trainer, residual_config

V = 101


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, norm_eps=1e-12)
    residual = kw.pop("residual", {})
    base.update(kw)
    return ModelConfig(residual=residual_config(**residual), **base)


def pair(variant: ModelConfig, seed: int = 0) -> tuple[Transformer, Transformer]:
    """A baseline and a variant sharing every sublayer weight (the variant's extra parameters keep their init)."""
    torch.manual_seed(seed)
    base = Transformer(cfg(n_layers=variant.n_layers))
    torch.manual_seed(seed + 1)
    other = Transformer(variant)
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("_res." in k or k.startswith("stream.") for k in missing), missing
    return base.eval(), other.eval()


def tokens(batch=2, T=12, seed=0):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- standard residual


def test_standard_residual_is_bit_identical_to_plain_prenorm():
    torch.manual_seed(0)
    model = Transformer(cfg()).eval()
    idx = tokens()
    x = model.embed(idx)
    from stabletrain.models.layers import rope_tables

    cos, sin = rope_tables(idx.shape[1], 8, 10000.0)
    for b in model.blocks:  # the spine's block, written out
        x = x + b.attn(b.attn_norm(x), cos, sin)
        x = x + b.mlp(b.mlp_norm(x))
    assert torch.equal(model(idx), model.head(model.norm(x)))


# ---------------------------------------------------------------- Hyper-Connections


@pytest.mark.parametrize("dynamic, use_tanh", [(True, True), (True, False), (False, True)])
def test_hc_paper_init_equals_baseline_logits(dynamic, use_tanh):
    base, hc = pair(cfg(residual=dict(kind="hc", streams=4, dynamic=dynamic, tanh=use_tanh)))
    idx = tokens()
    torch.testing.assert_close(hc(idx), base(idx), rtol=1e-5, atol=1e-5)


def test_hc_single_static_stream_is_bit_equivalent():
    base, hc = pair(cfg(residual=dict(kind="hc", streams=1, dynamic=False)))
    idx = tokens()
    assert torch.equal(hc(idx), base(idx))


def test_hc_static_parts_get_no_weight_decay_and_param_count():
    c = cfg(residual=dict(kind="hc", streams=4, dynamic=True))
    model = Transformer(c)
    conn = model.blocks[0].attn_res
    assert conn.A_r.no_weight_decay and conn.B.no_weight_decay and conn.A_m.no_weight_decay
    assert param_count(c) == sum(p.numel() for p in model.parameters())
    n, C = 4, 32  # docs/methods.md §1: n(n+2) static; C(n+2) + n(n+2) + 2 (+ norm weights) dynamic
    assert sum(p.numel() for p in conn.parameters()) == C * (n + 2) + n * (n + 2) + 2 + C
    assert sum(
        p.numel()
        for p in Transformer(cfg(residual=dict(kind="hc", streams=4, dynamic=False))).blocks[0].attn_res.parameters()
    ) == n * (n + 2)
    # A_m at init is the one-hot e_{k mod n} of sublayer k.
    assert model.blocks[1].mlp_res.A_m.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_hc_composite_gain_is_exactly_one_at_init():
    model = Transformer(cfg(residual=dict(kind="hc", streams=4)))
    for c in model.connections():
        c.record = True
    model(tokens())
    fwd, bwd = amax_gains([c.last_mix for c in model.connections()])
    assert fwd == [1.0] * 6 and bwd == [1.0] * 6


# ---------------------------------------------------------------- mHC


def mhc_conn(n=4, C=16, **kw) -> ManifoldConnection:
    torch.manual_seed(0)
    return ManifoldConnection(
        C, n, sublayer_index=1, cfg=residual_config(kind="mhc", streams=n, **kw), depth_scale=None, signal=None
    )


def test_mhc_coefficient_ranges_and_doubly_stochastic_mixing():
    conn = mhc_conn(gate_init=0.5, phi_std=0.3)  # coefficients well away from their init, not saturated
    x = torch.randn(3, 7, 4, 16) * 3
    pre, post, res = conn.coefficients(x)
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
    assert (res >= 0).all()
    torch.testing.assert_close(res.sum(-1), torch.ones(3, 7, 4), rtol=0, atol=1e-6)
    assert torch.linalg.matrix_norm(res, ord=2).max() <= 1 + 1e-3


def test_mhc_fused_equals_unfused():
    conn = mhc_conn(phi_std=0.5, gate_init=0.7)
    x = torch.randn(2, 5, 4, 16)
    torch.testing.assert_close(conn.logits(x, fused=True), conn.logits(x, fused=False), rtol=1e-5, atol=1e-5)


def test_mhc_param_count_per_sublayer():
    n, C = 4, 16
    assert sum(p.numel() for p in mhc_conn(n, C).parameters()) == (n * n + 2 * n) * (n * C + 1) + 3
    c = cfg(residual=dict(kind="mhc", streams=4, collapse="head"))
    assert param_count(c) == sum(p.numel() for p in Transformer(c).parameters())


def test_mhc_applies_h_res_not_its_transpose():
    """x' = H_res x with rows summing to 1: identical streams stay identical; the transpose would break them."""
    conn = mhc_conn(n=3, C=4)
    M = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])  # rows sum to 1, columns do not
    x = torch.arange(12.0).view(1, 1, 3, 4)
    out = conn.write(x, torch.zeros(1, 1, 4), (torch.zeros(1, 1, 3), M.view(1, 1, 3, 3)))
    torch.testing.assert_close(out[0, 0], M @ x[0, 0])
    same = torch.ones(1, 1, 3, 4)
    out = conn.write(same, torch.zeros(1, 1, 4), (torch.zeros(1, 1, 3), M.view(1, 1, 3, 3)))
    torch.testing.assert_close(out, same)


def test_mhc_one_stream_with_zero_phi_equals_baseline():
    base, mhc = pair(cfg(residual=dict(kind="mhc", streams=1, init="megatron")))
    for c in mhc.connections():
        c.phi.data.zero_()
    idx = tokens()
    torch.testing.assert_close(mhc(idx), base(idx), rtol=1e-5, atol=1e-5)


def test_mhc_alpha_zero_equals_baseline_for_any_pre_and_res_bias():
    """docs/methods.md §2: repeat expansion, alpha = 0, b_post = 0, random b_pre and b_res."""
    base, mhc = pair(cfg(residual=dict(kind="mhc", streams=4, gate_init=0.0)))
    g = torch.Generator().manual_seed(5)
    for c in mhc.connections():
        c.bias.data[:4] = torch.randn(4, generator=g) * 3
        c.bias.data[4:8] = 0.0
        c.bias.data[8:] = torch.randn(16, generator=g) * 3
    idx = tokens()
    torch.testing.assert_close(mhc(idx), base(idx), rtol=1e-4, atol=1e-4)


def one_step_streams(residual: dict, trap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_pre of the first connection, final stream state [B,T,n,C]) after one AdamW step."""
    torch.manual_seed(0)
    model = Transformer(cfg(residual=dict(kind="mhc", streams=4, **residual)))
    if trap:  # phi = 0 and permutation-symmetric biases: every gradient is symmetric across streams
        for c in model.connections():
            c.phi.data.zero_()
            c.bias.data.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens()
    model(idx, idx).backward()
    opt.step()
    states = []
    model.probe = type("Probe", (), {"observe": lambda self, i, x: states.append(x.detach())})()
    model(idx)
    return model.connections()[0].bias.detach()[:4], states[-1]


def spread(t: torch.Tensor, dim: int) -> float:
    return (t - t.mean(dim, keepdim=True)).abs().max().item()


def test_mhc_symmetry_trap_and_its_avoidance():
    """docs/methods.md §2: with phi = 0 and symmetric biases the streams never separate; random phi breaks that."""
    trap_bias, trap_state = one_step_streams({"init": "megatron"}, trap=True)
    assert spread(trap_bias, 0) == 0.0 and spread(trap_state, -2) < 1e-7
    # The recommended (HC-faithful, default) init: per-stream read biases get different updates and the stream
    # states differ. (Megatron's all-zero biases mix uniformly, J/n, which re-averages the streams at every
    # sublayer: see docs/residual-streams.md for how slowly they separate.)
    bias, state = one_step_streams({"init": "hc"})
    assert spread(bias - bias.mean(), 0) > 1e-4
    assert spread(state, -2) > 1e-4


def test_mhc_init_schemes():
    hc = mhc_conn(init="hc")
    pre, post, res = hc.coefficients(torch.randn(1, 1, 4, 16))
    assert pre[0, 0].argmax() == 1 and pre[0, 0, 1] > 0.95 and (pre[0, 0, [0, 2, 3]] < 0.05).all()
    assert torch.diagonal(res[0, 0]).min() > 0.9
    torch.testing.assert_close(post, torch.ones_like(post), rtol=0, atol=0.05)
    meg = mhc_conn(init="megatron", gate_init=0.0)
    pre, post, res = meg.coefficients(torch.randn(1, 1, 4, 16))
    torch.testing.assert_close(pre, torch.full_like(pre, 0.5))
    torch.testing.assert_close(res, torch.full_like(res, 0.25))


# ---------------------------------------------------------------- LayerNorm Scaling


def test_lns_scale_vector_and_depth_one_equals_baseline():
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, norm=LNSConfig()))
    scales = [b.attn_res.depth_scale for b in model.blocks]
    assert scales == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5]
    assert all(b.mlp_res.depth_scale == b.attn_res.depth_scale for b in model.blocks)
    torch.manual_seed(0)
    base = Transformer(cfg(n_layers=1)).eval()
    lns = Transformer(
        ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, norm_eps=1e-12, norm=LNSConfig())
    ).eval()
    lns.load_state_dict(base.state_dict())
    idx = tokens()
    assert torch.equal(lns(idx), base(idx))


def test_lns_changes_deeper_blocks():
    torch.manual_seed(0)
    base = Transformer(cfg(n_layers=3)).eval()
    lns = Transformer(
        ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, norm_eps=1e-12, norm=LNSConfig())
    ).eval()
    lns.load_state_dict(base.state_dict())
    assert not torch.allclose(lns(tokens()), base(tokens()))


# ---------------------------------------------------------------- BSLO propagation scalar


def test_bslo_alpha_is_one_when_norms_are_equal_and_warms_up_clamped_frozen():
    s = PropagationScalar(BSLOConfig(warmup_steps=2, eps=1e-6))
    h = torch.randn(4, 5, 8)
    y = torch.zeros_like(h)  # |h + y| == |h|
    for _ in range(3):
        s(h, y)
    assert s.alpha().item() == pytest.approx(1.0, abs=1e-6)
    big = PropagationScalar(BSLOConfig(warmup_steps=1))
    big(h, h * 99)  # output norm 100x the input: alpha would be 0.01, clamped to 0.1
    assert big.alpha().item() == pytest.approx(0.1)
    fresh = PropagationScalar(BSLOConfig(warmup_steps=5))
    fresh(h, h * 99)
    assert fresh.alpha().item() == 1.0  # warm-up
    fresh.eval()
    before = (fresh.ema_in.clone(), fresh.ema_out.clone(), fresh.updates.clone())
    fresh(h, h)
    assert (fresh.ema_in, fresh.ema_out, fresh.updates) == before


def test_bslo_scales_the_sublayer_output_without_gradient_into_the_scalar():
    s = PropagationScalar(BSLOConfig(warmup_steps=0))
    h = torch.randn(2, 3, 8)
    s(h, h)  # |h + h| = 2|h|: alpha = 0.5 next time
    y = torch.randn(2, 3, 8, requires_grad=True)
    out = s(h, y)
    torch.testing.assert_close(out, y * 0.5, rtol=1e-5, atol=1e-6)
    assert not any(b.requires_grad for b in s.buffers())


# ---------------------------------------------------------------- gain diagnostics


def test_amax_gains_on_known_matrices_are_exact():
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    C = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    fwd, bwd = amax_gains([A, B, C])
    # Both of the product from sublayer k to the top, P = CBA = [[2,1],[0,-3]], CB = [[1,1],[0,-3]], C:
    # max |row sum| = 3, 3, 3 (forward) and max |column sum| = 2, 2, 3 (backward).
    assert fwd == [3.0, 3.0, 3.0]
    assert bwd == [2.0, 2.0, 3.0]
    # From the input: A, BA = [[2,1],[0,1]], CBA: max |row sum| = 2, 3, 3.
    assert amax_fwd_from_input([A, B, C]) == [2.0, 3.0, 3.0]


def test_gain_probe_forward_and_gradient_ratios_are_exact():
    probe = GainProbe(n_blocks=2)
    x0 = torch.randn(2, 5, 8, requires_grad=True)
    probe.observe(0, x0)
    x1 = 3 * x0
    probe.observe(1, x1)
    x2 = 0.5 * x1
    probe.observe(2, x2)
    (x2 * torch.randn_like(x2)).sum().backward()
    m = probe.metrics()
    assert m["gain/fwd/0"] == pytest.approx(3.0) and m["gain/fwd/1"] == pytest.approx(0.5)
    assert m["gain/grad/0"] == pytest.approx(3.0) and m["gain/grad/1"] == pytest.approx(0.5)
    assert m["gain/fwd_max"] == pytest.approx(3.0)
    probe.observe(0, x0 * 100)  # a second micro-batch is ignored
    assert probe.metrics()["gain/fwd/0"] == pytest.approx(3.0)


@pytest.mark.slow  # torch.compile takes ~40 s on 2 cores
@pytest.mark.xdist_group("inductor")  # with test_recompute's fused case, which reuses the compiled kernels
def test_mhc_fused_kernel_matches_eager_reference():
    """kernel=fused (torch.compile'd read/write) computes the same logits and gradients as the PyTorch reference."""
    models = {}
    for kernel in ("eager", "fused"):
        torch.manual_seed(0)
        models[kernel] = Transformer(
            cfg(
                n_layers=2,
                residual=dict(kind="mhc", streams=4, kernel=kernel, init="megatron", phi_std=0.5, gate_init=1.0),
            )
        )
    ids = torch.randint(0, V, (2, 15))  # test_recompute's shapes: the kernels compile once per worker
    out = {}
    for kernel, model in models.items():
        logits = model(ids)
        (logits.float().square().mean()).backward()
        with torch.no_grad():
            model.eval()
            out[kernel] = (logits.detach(), model(ids), {n: p.grad for n, p in model.named_parameters()})
    (le, ie, ge), (lf, if_, gf) = out["eager"], out["fused"]
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(if_, ie, rtol=1e-5, atol=1e-5)
    for name in ge:
        torch.testing.assert_close(gf[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
    # The coefficients are not trivial here, so the check would catch a wrong mixing or a transposed H_res.
    conn = models["eager"].blocks[0].attn_res
    _, _, res = conn.coefficients(torch.randn(3, 4, 32))
    assert (res - torch.eye(4)).abs().max() > 0.1 and (res - 0.25).abs().max() > 0.05
    # The fused stream keeps the write after each sublayer pending and fuses it with the next read (across block
    # boundaries too); gain diagnostics see it written out at every block boundary, with the eager values.
    pending = models["fused"].blocks[0](models["fused"].stream.expand(torch.randn(2, 15, 32)), *rope_tables(15, 8, 1e4))
    # (the shapes of the training pass above: a new shape would compile the kernels again)
    assert type(pending).__name__ == "PendingWrite"
    assert models["fused"].stream.materialize(pending).shape == (2, 15, 4, 32)
    metrics = {}
    for kernel, model in models.items():
        model.train()
        monitor, trainer = GainMonitor(1), one_rank_trainer(model)
        monitor.on_step_begin(trainer, 1)
        model(ids).float().square().mean().backward()
        monitor.on_step_end(trainer, 1, metrics.setdefault(kernel, {}))
    assert set(metrics["fused"]) == set(metrics["eager"]) and "gain/amax_fwd_max" in metrics["fused"]
    for key, value in metrics["eager"].items():
        assert metrics["fused"][key] == pytest.approx(value, rel=1e-4), key
