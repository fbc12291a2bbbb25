"""Every residual variant trains end to end through train.py, on one process and on 2 ranks under ZeRO-2."""

import pytest

from tests.helpers import read_jsonl, train, train_jobs, val_rows

pytestmark = pytest.mark.slow

VARIANTS = {
    "hc": ["model=hc"],
    "mhc": ["model=mhc"],
    "lns": ["model=lns"],
    "bslo": ["model/signal=bslo", "model.signal.warmup_steps=5"],
    "mhc_head_lns": ["model=mhc", "model.residual.collapse=head", "model/norm=lns"],
}


def gain_rows(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "gain/fwd/0" in r]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_single_process(tmp_path, name):
    run = tmp_path / name
    train(
        run,
        *VARIANTS[name],
        "trainer.max_steps=30",
        "trainer.eval_interval=15",
        "monitor.gain_interval=10",
        "logging=none",
    )
    vals = val_rows(run)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5
    gains = gain_rows(run)
    assert [r["step"] for r in gains] == [1, 10, 20, 30]
    assert all(f"gain/grad/{l}" in gains[-1] for l in range(2))
    if name in ("hc", "mhc", "mhc_head_lns"):
        assert {f"gain/amax_fwd/{k}" for k in range(1, 5)} <= set(gains[-1])
        assert gains[0]["gain/amax_fwd_max"] == pytest.approx(1.0, abs=1e-3 if "mhc" in name else 1e-12)
    if name == "bslo":
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "bslo/alpha_min" in r]
        assert rows[0]["bslo/alpha_min"] == 1.0 and rows[-1]["bslo/alpha_min"] != 1.0


TWO_RANK = ["hc", "mhc", "lns", "bslo"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Each variant on 2 ranks under ZeRO-2, in one torchrun launch."""
    root = tmp_path_factory.mktemp("variants")
    common = ["engine=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=12", "trainer.eval_interval=6",
              "logging=none"]  # fmt: skip
    status = train_jobs([(root / n, [*VARIANTS[n], *common]) for n in TWO_RANK], nproc=2)
    assert set(status.values()) == {0}, status
    return root


@pytest.mark.parametrize("name", TWO_RANK)
def test_variant_trains_on_two_ranks_zero2(two_rank_runs, name):
    vals = val_rows(two_rank_runs / name)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.2
