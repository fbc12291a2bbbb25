"""Golden numbers: per-step losses and gradient norms of 20-step fp32 runs must not move unless a change means
them to (then regenerate with `.venv/bin/python -m tests.golden.regenerate` and say so in the commit)."""

import json

import pytest

from tests.golden.regenerate import GOLDEN_DIR, VARIANTS, run_variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_golden_per_step_numbers_hold(tmp_path, name):
    golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    fresh = run_variant(name, tmp_path / name)
    assert fresh["overrides"] == golden["overrides"]
    assert len(fresh["loss"]) == len(golden["loss"]) == 20
    assert fresh["loss"] == pytest.approx(golden["loss"], rel=1e-5, abs=0)
    assert fresh["grad_norm"] == pytest.approx(golden["grad_norm"], rel=1e-5, abs=0)
