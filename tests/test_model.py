import math

import pytest
import torch

from stabletrain.config import AttentionConfig, FFNConfig, ModelConfig
from stabletrain.models import Transformer, flops_per_token, param_count
from stabletrain.models.layers import GQAConfig, RMSNorm, apply_rope, rope_tables


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = [
    tiny(),
    tiny(attention=GQAConfig(n_kv_heads=2)),
    tiny(tie_embeddings=True),
    tiny(ffn=FFNConfig(hidden=48), n_layers=3),
    tiny(attention=GQAConfig(n_kv_heads=1), d_model=64, n_heads=8),
    tiny(attention=AttentionConfig(qk_norm=True)),
]


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"{c.attention.kind}-kv{c.kv_heads}-tie{c.tie_embeddings}-L{c.n_layers}-qk{c.attention.qk_norm}",
)
def test_param_count_equals_formula(cfg):
    model = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 97, (3, 11))
    assert model(idx).shape == (3, 11, 97)
    loss = model(idx, idx)
    assert loss.ndim == 0
    # At init the logits are near zero: the loss is close to ln(vocab).
    assert abs(loss.item() - math.log(97)) < 0.3


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["mha", "gqa"])
def test_causality(cfg):
    """Changing token t never changes the logits at positions before t."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 97, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with k/v heads copied into MHA's k/v projections computes the same function."""
    torch.manual_seed(0)
    gqa = Transformer(tiny(attention=GQAConfig(n_kv_heads=2)))
    mha = Transformer(tiny())
    state = gqa.state_dict()
    hd = 32 // 4
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[key].view(2, hd, 32)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    model = Transformer(tiny(tie_embeddings=True))
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_init_std_and_scaled_residual_init():
    torch.manual_seed(0)
    cfg = tiny(d_model=256, n_heads=4, n_layers=8, init_std=0.02, vocab_size=512)
    model = Transformer(cfg)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    plain = Transformer(tiny(d_model=256, n_heads=4, n_layers=8, residual_init="plain", vocab_size=512))
    assert plain.blocks[0].mlp.w_down.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_rmsnorm_unit_rms_and_rope_preserves_norm():
    x = torch.randn(4, 7, 32) * 5
    y = RMSNorm(32, eps=1e-12)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 7), rtol=1e-5, atol=1e-5)
    cos, sin = rope_tables(7, 16, 10000.0)
    q = torch.randn(2, 3, 7, 16)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # Position 0 is not rotated.
    torch.testing.assert_close(apply_rope(q, cos, sin)[:, :, 0], q[:, :, 0])


def test_flops_per_token_palm_formula():
    cfg = tiny(d_model=64, n_heads=4, n_layers=3, vocab_size=1000)
    n_embed = 1000 * 64
    n_norm = (2 * 3 + 1) * 64
    matmul_params = param_count(cfg) - n_embed - n_norm  # head and all block matmuls
    assert flops_per_token(cfg, 128) == 6 * matmul_params + 12 * 3 * 64 * 128


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    torch.manual_seed(0)
    model = Transformer(tiny(attention=AttentionConfig(qk_norm=True), norm_eps=1e-12)).eval()
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(50.0)
            block.attn.k_proj.weight.mul_(0.02)
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
    plain = Transformer(tiny()).eval()  # without QK-norm the same rescaling changes the logits
    ref = plain(ids)
    with torch.no_grad():
        plain.blocks[0].attn.q_proj.weight.mul_(50.0)
    assert (plain(ids) - ref).abs().max() > 1e-2


def test_logit_z_loss_adds_the_squared_log_normaliser():
    torch.manual_seed(0)
    cfg = tiny(logit_z_loss=1e-2)
    model = Transformer(cfg)
    ids, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    logits = model(ids)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected = ce + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(model(ids, targets), expected)
    cfg.logit_z_loss = 0.0
    torch.testing.assert_close(model(ids, targets), ce)


def test_grad_clip_warmup_ramps_the_threshold():
    from stabletrain.config import Config
    from stabletrain.optim import clip_threshold

    cfg = Config()
    cfg.optim.grad_clip, cfg.optim.grad_clip_warmup_steps, cfg.optim.grad_clip_warmup_start = 1.0, 4, 0.1
    assert [round(clip_threshold(cfg, s), 4) for s in range(1, 7)] == [0.1, 0.325, 0.55, 0.775, 1.0, 1.0]
    cfg.optim.grad_clip_warmup_steps = 0
    assert clip_threshold(cfg, 1) == 1.0
    cfg.optim.grad_clip = 0.0
    assert clip_threshold(cfg, 1) == math.inf
