"""MoE end to end through train.py: every router trains (1 process and 2 ranks); aux-free balances; plans."""

import re

import pytest

from tests.helpers import train, train_jobs, train_rows, val_rows

pytestmark = pytest.mark.slow

MOE = ["model=moe", "model.ffn.expert_hidden=32", "model.ffn.n_routed=8", "model.ffn.top_k=2"]


@pytest.mark.parametrize("router", ["none", "softmax_aux", "aux_free", "bslo"])
def test_each_router_trains_single_process(tmp_path, router):
    run = tmp_path / router
    train(run, *MOE, f"model/ffn/router={router}", "trainer.max_steps=30", "trainer.eval_interval=15", "logging=none")
    vals = val_rows(run)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5
    assert all("moe/maxvio_global" in v for v in vals)
    rows = train_rows(run)
    assert all("moe/maxvio_batch" in r and len(r["moe/load/1"]) == 8 for r in rows)


ROUTERS = ["none", "softmax_aux", "aux_free", "bslo"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every router on 2 ranks under ZeRO-2, in one torchrun launch."""
    root = tmp_path_factory.mktemp("routers")
    common = [*MOE, "engine=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=12", "trainer.eval_interval=6",
              "logging=none"]  # fmt: skip
    status = train_jobs([(root / r, [*common, f"model/ffn/router={r}"]) for r in ROUTERS], nproc=2)
    assert set(status.values()) == {0}, status
    return root


@pytest.mark.parametrize("router", ROUTERS)
def test_router_trains_on_two_ranks(two_rank_runs, router):
    run = two_rank_runs / router
    vals = val_rows(run)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.2
    # Loads are counted over the global batch (both ranks): 8 sequences x 64 tokens x top-2 per step.
    assert sum(train_rows(run)[0]["moe/load/1"]) == 8 * 64 * 2


def test_aux_free_balances_better_than_no_balancing(tmp_path):
    common = (*MOE, "trainer.max_steps=80", "trainer.eval_interval=80", "logging=none", "optim.lr=3e-3")
    train(tmp_path / "none", *common, "model/ffn/router=none")
    train(tmp_path / "aux_free", *common, "model/ffn/router=aux_free", "model.ffn.router.bias_update_rate=1e-2")

    def late_maxvio(run):
        rows = train_rows(run)[-20:]
        return sum(r["moe/maxvio_batch"] for r in rows) / len(rows)

    assert late_maxvio(tmp_path / "aux_free") < 0.6 * late_maxvio(tmp_path / "none")
    assert (
        val_rows(tmp_path / "aux_free")[-1]["moe/maxvio_global"] < val_rows(tmp_path / "none")[-1]["moe/maxvio_global"]
    )


def test_aux_free_bias_is_checkpointed_and_resumes(tmp_path):
    run = tmp_path / "run"
    common = (*MOE, "trainer.max_steps=6", "trainer.eval_interval=0", "logging=none")
    train(run / "straight", *common)
    train(run / "split", *common, "trainer.stop_at=3")
    train(run / "split", *common, "trainer.resume=auto")
    assert [r["loss"] for r in train_rows(run / "split")] == [r["loss"] for r in train_rows(run / "straight")]


@pytest.mark.parametrize("model, lo, hi", [("mhc_3b", 2.5e9, 3.5e9), ("mhc_9b", 8.5e9, 9.5e9), ("mhc_27b", 26e9, 28e9)])
def test_plan_reports_the_paper_scale_without_hardware(tmp_path, model, lo, hi):
    """trainer.plan=true through train.py's run (in this process: the meta-device model is the cost)."""
    proc = train(tmp_path / "plan", f"model={model}", "trainer.plan=true", "engine=zero3", "precision=bf16",
                 "trainer.plan_world_size=64", tiny=False)  # fmt: skip
    total = int(re.search(r"^total_params=(\d+)$", proc.stdout, re.M).group(1))
    active = int(re.search(r"^active_params=(\d+)$", proc.stdout, re.M).group(1))
    assert lo < total < hi and active < total / 3
    assert "memory per GPU (ZeRO-3, bf16, 64 GPU(s)" in proc.stdout
