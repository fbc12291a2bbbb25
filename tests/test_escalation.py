"""monitor.response=escalate: skip, then cut the learning rate, then roll back and skip data, then abort; every rung at
its exact step, a skipped update leaving Adam's moments and step count alone, and the acceptance burst."""

from pathlib import Path

import pytest
import torch

from stabletrain.config.monitor import EscalateConfig
from stabletrain.optim import lr_multiplier
from stabletrain.training.escalation import Ladder
from tests.helpers import TINY, composed, read_jsonl, train, train_rows


def events(run: Path, *kinds: str) -> list[dict]:
    return [e for e in read_jsonl(run / "events.jsonl") if e["kind"] in kinds]


def test_the_ladder_climbs_one_rung_per_firing_and_starts_again_after_a_quiet_spell():
    ladder = Ladder(EscalateConfig(skips=2, lr_factor=0.5, cooldown=10, max_rollbacks=1, window=20))
    rungs = [ladder.decide(s, "spike").action for s in (70, 71, 72)]
    assert rungs == ["skip", "skip", "lr_cut"] and ladder.lr_scale(82) == 0.5 and ladder.lr_scale(83) == 1.0
    assert ladder.decide(73, "spike").action == "rollback"
    ladder.rolled_back(50)
    assert ladder.lr_scale(60) == 0.5 and ladder.lr_scale(61) == 1.0
    assert ladder.decide(55, "spike").action == "abort"  # a firing during the cut after max_rollbacks rollbacks
    calm = Ladder(EscalateConfig(skips=1, cooldown=5, window=20))
    assert [calm.decide(s, "x").action for s in (10, 11, 50, 51)] == ["skip", "lr_cut", "skip", "lr_cut"]


BURST = ["monitor.response=escalate", "monitor.inject.scale=100", "trainer.eval_interval=0", "logging=none"]


def test_a_burst_climbs_every_rung_at_its_exact_step_to_the_abort_status(tmp_path):
    """Loss spikes injected at steps 70..85 (each once per process): 70 and 71 skipped, 72 cuts the rate (and is
    skipped), 73 falls in the cut: roll back to step 50 and skip >= 200 batches; the replay meets the burst's later
    steps (74, 75: rolled back again) and the firing at 76, after 3 rollbacks, aborts with exit status 3."""
    run = tmp_path / "run"
    steps = ",".join(str(s) for s in range(70, 86))
    proc = train(run, *BURST, f"monitor.inject.steps=[{steps}]", "trainer.max_steps=100", "trainer.ckpt_interval=50",
                 check=False)  # fmt: skip
    assert proc.returncode == 3 and "monitor.escalate.max_rollbacks" in proc.stderr.splitlines()[-1]
    ladder = [(e["kind"], e.get("from_step", e["step"])) for e in events(run, "skip_step", "lr_cut", "rollback",
                                                                         "abort")]  # fmt: skip
    assert ladder == [("skip_step", 70), ("skip_step", 71), ("lr_cut", 72), ("rollback", 73), ("rollback", 74),
                      ("rollback", 75), ("abort", 76)]  # fmt: skip
    rollbacks = events(run, "rollback")
    assert all(e["step"] == 50 and e["batches_skipped"] >= 200 and e["skip_batches"][0] == 50 for e in rollbacks)
    assert (run / "spikes/76/report.md").is_file()  # the forensics report of the firing that aborted


def test_a_short_burst_rolls_back_once_and_the_run_ends_cleanly(tmp_path):
    """Spikes at 70..73: skip, skip, cut, roll back to 50 skipping batches 50..249; the replay is clean, at half the
    scheduled rate while the cut lasts (through step 50 + 100), and reads the batches after the skipped ones."""
    run = tmp_path / "run"
    train(run, *BURST, "monitor.inject.steps=[70,71,72,73]", "trainer.max_steps=90", "trainer.ckpt_interval=50")
    assert [e["kind"] for e in events(run, "skip_step", "lr_cut", "rollback", "abort")] == [
        "skip_step", "skip_step", "lr_cut", "rollback"]  # fmt: skip
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 91))
    cfg = composed(*TINY, *BURST, "trainer.max_steps=90")
    schedule = [cfg.optim.lr * lr_multiplier(s - 1, cfg) for s in range(51, 91)]
    assert [r["lr"] for r in rows[50:]] == pytest.approx([0.5 * x for x in schedule])
    assert rows[50]["samples"] == (250 + 1) * 8  # step 51 reads the first batch after the skipped ones


def test_a_skipped_update_leaves_adam_moments_and_step_count_unchanged(tmp_path):
    """Three updates vetoed at 66-68 (skip, skip, lr_cut): Adam's step count is the number of applied updates (72 of
    75), so the bias correction is not advanced by skipped steps (OLMo-core once trained with a 2.2x effective
    rate that way); the rate is halved from step 68 through the cooldown."""
    run = tmp_path / "run"
    train(run, *BURST, "monitor.inject.steps=[66,67,68]", "trainer.max_steps=75", "monitor.escalate.cooldown=5")
    assert [e["step"] for e in events(run, "skip_step", "lr_cut")] == [66, 67, 68]
    state = torch.load(run / "checkpoints/step_00000075/mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)  # fmt: skip
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {72.0}
    cfg = composed(*TINY, *BURST, "trainer.max_steps=75")
    applied_before = {s: s - 1 if s <= 66 else max(65, s - 4) for s in range(60, 76)}  # vetoed: no advance
    cut = {s: 0.5 if 69 <= s <= 73 else 1.0 for s in range(60, 76)}  # from the step after the cut, for 5 steps
    expected = [cfg.optim.lr * lr_multiplier(applied_before[s], cfg) * cut[s] for s in range(60, 76)]
    assert [r["lr"] for r in train_rows(run)[59:]] == pytest.approx(expected)
