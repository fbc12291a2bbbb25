"""docs/methods.md §4 (auxiliary-loss-free balancing) and §6 (BSLO capacity gating) invariants, and MoE counting."""

import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stabletrain.config import ModelConfig
from stabletrain.models import ROUTERS, Transformer, param_count
from stabletrain.models.moe import MoE, Router, maxvio
from stabletrain.training.callbacks import global_loads, update_router_biases
from tests.helpers import moe_config

C = 16


def router(router: str = "aux_free", **kw) -> Router:
    torch.manual_seed(0)
    cfg = moe_config(router, **{"n_routed": 8, "top_k": 2, **kw})
    return ROUTERS[router].obj(C, cfg)


def test_bias_gets_no_gradient_and_is_checkpointed():
    moe = MoE(C, moe_config(n_routed=8, top_k=2, expert_hidden=8))
    moe(torch.randn(2, 5, C)).sum().backward()
    assert not moe.router.bias.requires_grad and moe.router.bias.grad is None
    assert "router.bias" in moe.state_dict() and "router.load" not in moe.state_dict()
    assert moe.router.weight.grad is not None


def test_output_independent_of_bias_when_selection_is_fixed():
    moe = MoE(C, moe_config(n_routed=8, top_k=2, expert_hidden=8, route_scale=2.5)).eval()
    x = torch.randn(2, 7, C)
    base_idx, _ = moe.router(x)
    out = moe(x)
    moe.router.bias += 0.37  # the same shift for every expert: the top-K set cannot change
    idx, _ = moe.router(x)
    assert torch.equal(idx, base_idx)
    assert torch.equal(moe(x), out)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_selected_gates_sum_to_one_before_route_scale(scale):
    r = router(route_scale=scale)
    r.bias.copy_(torch.randn(8))
    _, gates = r(torch.randn(3, 5, C))
    torch.testing.assert_close(gates.sum(-1), torch.full((3, 5), scale))


def test_overloaded_expert_bias_drops_by_exactly_u_and_u_zero_changes_nothing():
    r = router(bias_update_rate=1e-3)
    load = torch.tensor([[100.0, 10, 10, 10, 10, 10, 10, 10]])
    for step in range(1, 4):
        update_router_biases([r], load)
        assert r.bias[0].item() == pytest.approx(-1e-3 * step, abs=1e-9)
        assert r.bias[1:].tolist() == pytest.approx([1e-3 * step] * 7, abs=1e-9)
    frozen = router(bias_update_rate=0.0)
    update_router_biases([frozen], load)
    assert torch.equal(frozen.bias, torch.zeros(8))
    other = router(router="softmax_aux")  # no balancing state: the update changes nothing
    before = {k: v.clone() for k, v in other.state_dict().items()}
    update_router_biases([other], load)
    assert "bias" not in before and all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def _two_rank_update(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    r = router(bias_update_rate=1e-3)
    torch.manual_seed(100 + rank)  # each rank routes different tokens
    r(torch.randn(4, 9, C))

    def dp_all_reduce(t):
        dist.all_reduce(t)
        return t

    trainer = SimpleNamespace(engine=SimpleNamespace(dp_all_reduce=dp_all_reduce))
    loads = global_loads(trainer, {0: r})
    update_router_biases([r], loads)
    torch.save({"bias": r.bias.clone(), "loads": loads}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_bias_update_is_identical_across_ranks(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_two_rank_update, args=(init_file, str(tmp_path / "out")), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    assert torch.equal(a["bias"], b["bias"]) and torch.equal(a["loads"], b["loads"])
    assert a["loads"].sum() == 2 * 4 * 9 * 2  # both ranks' tokens, top-2 each
    assert a["bias"].abs().max() == pytest.approx(1e-3)


def test_aux_free_balances_a_skewed_router():
    torch.manual_seed(0)
    r = router(bias_update_rate=1e-3)
    with torch.no_grad():
        r.weight[0] += 1.0  # experts 0 and 1 attract most tokens
        r.weight[1] += 0.6
    history = []
    for _ in range(400):  # u = 1e-3 as in the paper; 4096 tokens per batch (noise floor ~0.06)
        r.load.zero_()
        r(torch.randn(64, 64, C))
        loads = r.load.clone().unsqueeze(0)
        history.append(maxvio(loads[0]))
        update_router_biases([r], loads)
    assert history[0] > 0.8
    assert sum(history[-20:]) / 20 < 0.1


def test_bslo_equals_softmax_without_overload_and_gates_sum_at_most_one():
    r = router(router="bslo", capacity_factor=100.0)  # nobody can be over capacity
    x = torch.randn(2, 6, C)
    idx, gates = r(x)
    probs = torch.softmax(torch.nn.functional.linear(x, r.weight), -1)
    top, top_idx = probs.topk(2, -1)
    assert torch.equal(idx, top_idx)
    torch.testing.assert_close(gates, top)
    tight = router(router="bslo", capacity_factor=0.5)
    with torch.no_grad():
        tight.weight[0] += 1.0  # overload expert 0
    _, gates = tight(x)
    assert (gates.sum(-1) <= 1 + 1e-6).all()
    assert (gates.sum(-1) < top.sum(-1) - 1e-3).any()  # overloaded experts' gates were scaled down


def test_softmax_aux_loss_is_positive_and_none_has_none():
    x = torch.randn(2, 6, C)
    aux = router(router="softmax_aux", aux_loss_coef=0.01)
    aux(x)
    assert aux.aux_loss.item() > 0
    plain = router(router="none")
    plain(x)
    assert plain.aux_loss.item() == 0.0
    z = router(router="none", z_loss_coef=1e-3)
    z(x)
    assert z.aux_loss.item() > 0


def test_group_limited_routing_uses_at_most_topk_groups():
    r = router(n_groups=4, topk_groups=1)
    idx, _ = r(torch.randn(3, 10, C))
    assert ((idx // 2)[..., 0] == (idx // 2)[..., 1]).all()  # both experts from one group of 2


def test_moe_param_counts_total_and_active():
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=4,
        ffn=moe_config(n_routed=6, n_shared=2, top_k=2, expert_hidden=16, first_dense=1),
    )
    model = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    per_expert = 3 * 32 * 16
    assert param_count(cfg) - param_count(cfg, active=True) == 2 * (6 - 2) * per_expert  # 2 MoE layers
    assert len(model.routers()) == 2


def test_loads_are_counted_and_the_moe_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn=moe_config(n_routed=4, top_k=2, expert_hidden=16, first_dense=0),
    )
    model = Transformer(cfg)
    idx = torch.randint(0, 50, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = model(idx, idx)
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0
    assert model.routers()[0].load.sum().item() == 20 * 4 * 12 * 2


def test_mla_moe_model_counts_and_is_causal():
    from stabletrain.models.mla import MLAConfig

    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        attention=MLAConfig(q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6),
        ffn=moe_config(n_routed=4, top_k=2, expert_hidden=16, first_dense=1),
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 50, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 50
    # Not bit-exact: a changed token can change how many tokens an expert's batched matmul sees.
    torch.testing.assert_close(model(changed)[:, :6], model(idx)[:, :6], rtol=0, atol=1e-6)
