"""The reproduction analysis on a trained run: the depth profile (per-block variance, pruning) it reports."""

import math

import pytest

from stabletrain.analysis.reproduce import depth_profile, lns_claims
from stabletrain.interop.run import load_run
from tests.helpers import train

pytestmark = pytest.mark.slow


def test_depth_profile_and_claim_rows(tmp_path):
    root = tmp_path / "lns"
    for kind in ("none", "lns"):
        for seed in (0, 1):
            train(root / f"{kind}_s{seed}", f"model/norm={kind}", f"trainer.seed={seed}", "model.n_layers=3",
                  "trainer.max_steps=4", "trainer.eval_interval=4", "logging=none")  # fmt: skip
    prof = depth_profile(load_run(root / "none_s0"), n_batches=1)
    assert len(prof["variance"]) == len(prof["prune_increase"]) == 3
    assert all(v > 0 for v in prof["variance"]) and any(abs(d) > 0 for d in prof["prune_increase"])
    rows, data = lns_claims(root)
    assert [r[0][:2] for r in rows] == ["3a", "3b", "3c"]
    assert all(r[3] in ("reproduced", "not reproduced", "inconclusive") for r in rows)
    assert all(math.isfinite(v) for vs in data["final"].values() for v in vs)
