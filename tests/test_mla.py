import math

import pytest
import torch

from stabletrain.models.layers import apply_rope, rope_tables
from stabletrain.models.mla import MLAConfig, MultiHeadLatentAttention, mla_param_count

D, H, THETA = 32, 4, 10000.0
# v_head_dim differs from qk_nope + qk_rope on purpose: SDPA must handle a distinct value head dim.
CFGS = [
    MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
]
IDS = ["q_direct", "q_lora"]


def make(cfg: MLAConfig, seed: int = 0) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(D, H, cfg)
    # Non-trivial norm weights, so that the reference has to apply them too.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def tables(cfg: MLAConfig, T: int):
    return rope_tables(T, cfg.qk_rope_head_dim, THETA)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_output_shape(cfg):
    m = make(cfg)
    x = torch.randn(3, 7, D)
    assert m(x, *tables(cfg, 7)).shape == (3, 7, D)
    assert hasattr(m, "q_a_proj") == (cfg.q_lora_rank > 0)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_causality(cfg):
    """Changing token t never changes the outputs before t, and does change position t."""
    m = make(cfg).eval()
    x = torch.randn(2, 10, D)
    cos, sin = tables(cfg, 10)
    base = m(x, cos, sin)
    for t in (0, 4, 9):
        changed = x.clone()
        changed[:, t] += torch.randn(2, D)
        out = m(changed, cos, sin)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize(
    "cfg",
    CFGS
    + [MLAConfig(q_lora_rank=8, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=6, v_head_dim=10), MLAConfig()],
    ids=IDS + ["odd_dims", "default"],
)
def test_param_count_equals_formula(cfg):
    m = MultiHeadLatentAttention(D, H, cfg)
    assert mla_param_count(D, H, cfg) == sum(p.numel() for p in m.parameters())


def test_rope_key_shared_across_heads():
    cfg = CFGS[1]
    m = make(cfg)
    # One down-projection emits the latent plus a single rope key per token, not one per head.
    assert m.kv_a_proj.out_features == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert m.kv_b_proj.out_features == H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    assert m.kv_a_norm.weight.numel() == cfg.kv_lora_rank


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_rope_is_positional_and_relative(cfg):
    m = make(cfg)
    x = torch.randn(2, 9, D)
    cos, sin = tables(cfg, 9)
    rotated = m(x, cos, sin)
    # No rotation (cos=1, sin=0) gives a different function: RoPE is really applied.
    plain = m(x, torch.ones_like(cos), torch.zeros_like(sin))
    assert not torch.allclose(rotated, plain, atol=1e-4)
    # Applied to q_rope and k_rope alike, so only relative positions matter: shifting all positions is a no-op.
    cos_s, sin_s = tables(cfg, 9 + 5)
    torch.testing.assert_close(m(x, cos_s[5:], sin_s[5:]), rotated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_position_enters_only_through_rope_dims(cfg):
    """With the rope query/key weights zeroed, the output no longer depends on the rope tables."""
    m = make(cfg)
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    with torch.no_grad():
        q_out = m.q_b_proj if cfg.q_lora_rank > 0 else m.q_proj
        q_out.weight.view(H, qk, -1)[:, cfg.qk_nope_head_dim :] = 0
        m.kv_a_proj.weight[cfg.kv_lora_rank :] = 0
    x = torch.randn(2, 9, D)
    cos, sin = tables(cfg, 9)
    a = m(x, cos, sin)
    b = m(x, torch.ones_like(cos), torch.zeros_like(sin))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def reference(m: MultiHeadLatentAttention, cfg: MLAConfig, x, cos, sin):
    """Per-head MLA written out with explicit softmax(QK^T/sqrt(d) + mask)V from the module's weights."""
    B, T, _ = x.shape
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def rms(z, w, eps=1e-6):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w

    if cfg.q_lora_rank > 0:
        q_all = rms(x @ m.q_a_proj.weight.T, m.q_a_norm.weight) @ m.q_b_proj.weight.T
    else:
        q_all = x @ m.q_proj.weight.T
    kv_a = x @ m.kv_a_proj.weight.T
    c_kv = rms(kv_a[..., :r], m.kv_a_norm.weight)
    k_rope = apply_rope(kv_a[..., r:].unsqueeze(1), cos, sin)[:, 0]  # [B, T, dr], the same for every head
    w_ukv = m.kv_b_proj.weight.view(H, dn + dv, r)
    mask = torch.full((T, T), float("-inf")).triu(1)
    heads = []
    for h in range(H):
        qh = q_all[..., h * (dn + dr) : (h + 1) * (dn + dr)]
        q_rope = apply_rope(qh[..., dn:].unsqueeze(1), cos, sin)[:, 0]
        q = torch.cat((qh[..., :dn], q_rope), -1)
        k = torch.cat((c_kv @ w_ukv[h, :dn].T, k_rope), -1)
        v = c_kv @ w_ukv[h, dn:].T
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dn + dr) + mask, dim=-1)
        heads.append(att @ v)
    return torch.cat(heads, -1) @ m.o_proj.weight.T


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_matches_explicit_reference(cfg):
    m = make(cfg)
    x = torch.randn(2, 8, D)
    cos, sin = tables(cfg, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x, cos, sin), reference(m, cfg, x, cos, sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_gradients_reach_every_parameter(cfg):
    m = make(cfg)
    x = torch.randn(2, 6, D, requires_grad=True)
    m(x, *tables(cfg, 6)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
