"""Spike detection and responses end to end through train.py: skip_step, rollback, stop, NaN, forensics, W&B."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

from stabletrain.analysis.wandb_offline import find_run_files, read_run
from tests.helpers import read_jsonl, tensor_paths, train, train_rows

pytestmark = pytest.mark.slow

DETECT = ["monitor.warmup_steps=10", "trainer.eval_interval=0", "logging=none"]


def events(run: Path, kind: str | None = None) -> list[dict]:
    rows = read_jsonl(run / "events.jsonl")
    return [r for r in rows if kind is None or r["kind"] == kind]


def engine_state(tag_dir: Path) -> dict:
    """Every tensor DeepSpeed saved (weights, optimizer moments) plus the LR schedule position, by path."""
    out = {}

    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith(("rng_rank", "state_rank")):
            state = torch.load(f, map_location="cpu", weights_only=False)
            tensor_paths(
                out=out,
                prefix=f.name,
                x={
                    k: v
                    for k, v in state.items()
                    if k
                    in (
                        "module",
                        "optimizer",
                        "optimizer_state_dict",
                        "base_optimizer_state",
                        "single_partition_of_fp32_groups",
                    )
                },
            )
            if state.get("lr_scheduler"):
                out[f.name + "/lr_epoch"] = torch.tensor(state["lr_scheduler"]["last_epoch"])
    return out


@pytest.mark.parametrize("engine", ["zero0", "zero2"])
def test_skip_step_leaves_weights_and_optimizer_untouched(tmp_path, engine):
    run = tmp_path / engine
    train(
        run,
        *DETECT,
        f"engine={engine}",
        "trainer.max_steps=30",
        "trainer.ckpt_interval=1",
        "trainer.keep_checkpoints=3",
        "monitor.inject.step=30",
        "monitor.inject.scale=30",
        "monitor.response=skip_step",
    )
    spikes = events(run, "spike")
    assert spikes and {e["step"] for e in spikes} == {30} and {e["metric"] for e in spikes} >= {"loss"}
    assert [e["step"] for e in events(run, "skip_step")] == [30]
    before, after = engine_state(run / "checkpoints/step_00000029"), engine_state(run / "checkpoints/step_00000030")
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    prev = engine_state(run / "checkpoints/step_00000028")  # sanity: a normal step does change them
    assert not all(torch.equal(prev[k], before[k]) for k in before)
    rows = train_rows(run)
    assert rows[-1]["update_skipped"] == 1 and rows[-1]["samples"] == 30 * 8  # the data position advanced
    assert "state" in (run / "spikes/30/report.md").read_text().splitlines()[0]


def test_poisoned_batch_rolls_back_skips_and_finishes(tmp_path):
    run = tmp_path / "run"
    train(
        run,
        "monitor.warmup_steps=10",
        "trainer.eval_interval=0",
        "logging=wandb",
        "trainer.max_steps=40",
        "trainer.ckpt_interval=10",
        "monitor.inject.step=26",
        "monitor.inject.kind=poison",
        "monitor.response=rollback",
        "monitor.rollback_skip_batches=3",
    )
    spike = events(run, "spike")
    assert spike[0]["step"] == 26 and spike[0]["batch"] == 25
    rb = events(run, "rollback")
    assert len(rb) == 1 and rb[0]["step"] == 20 and rb[0]["from_step"] == 26 and rb[0]["skip_batches"] == [23, 26]
    assert len(spike) == len({e["metric"] for e in spike})  # the poisoned batch was skipped: no second spike
    forensics = (run / "spikes/26/report.md").read_text()
    assert forensics.startswith("# Spike at step 26: data")
    facts = json.loads((run / "spikes/26/forensics.json").read_text())
    assert (run / "spikes/26/spike.png").stat().st_size > 10_000
    rows = train_rows(run)
    assert facts["previous"]["loss"] > rows[24]["loss"] + 2  # the old weights spike on that batch too
    assert [r["step"] for r in rows] == list(range(1, 41))  # one timeline in metrics.jsonl after the rollback
    # Replayed steps 21..23 saw the same batches; then batches 23-25 were skipped: step 24 reads batch 26.
    assert rows[23]["samples"] == (26 + 1) * 8 and rows[-1]["samples"] == (40 + 3) * 8
    wb = read_run(run)
    assert any(a["title"].startswith("stabletrain: spike in") and "step 26" in a["text"] for a in wb.alerts)
    assert any(h.get("events/spike") == 1 for h in wb.history)
    assert any(h.get("events/rollback") == 1 for h in wb.history)


def test_nan_never_reaches_the_weights_and_stop_exits_cleanly(tmp_path):
    run = tmp_path / "nan"
    train(run, *DETECT, "trainer.max_steps=12", "monitor.inject.step=5", "monitor.inject.kind=nan_loss")
    nonfinite = events(run, "nonfinite")
    assert [e["step"] for e in nonfinite] == [5, 5] and {e["metric"] for e in nonfinite} == {"loss", "grad_norm"}
    rows = train_rows(run)
    assert len(rows) == 12 and rows[4]["loss"] == "nan"  # the logger writes NaN as the string "nan"
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in rows if r["step"] != 5)
    weights = torch.load(next((run / "checkpoints/step_00000012").glob("*model_states.pt")), weights_only=False)[
        "module"
    ]
    assert all(torch.isfinite(w).all() for w in weights.values())

    stop = tmp_path / "stop"
    proc = train(
        stop,
        *DETECT,
        "trainer.max_steps=12",
        "monitor.inject.step=5",
        "monitor.inject.kind=nan_loss",
        "monitor.nonfinite.response=stop",
        check=False,
    )
    assert proc.returncode == 2
    assert "stopped at step 5 by monitor response 'stop': nonfinite in loss" in proc.stderr
    assert "step_00000005" in proc.stderr and (stop / "checkpoints/step_00000005/COMPLETE.json").is_file()
    assert [e["kind"] for e in events(stop)][-1] == "stop"


def test_skip_batches_are_honoured(tmp_path):
    run = tmp_path / "run"
    train(
        run,
        *DETECT,
        "trainer.max_steps=6",
        "trainer.skip_batches=[[2,4]]",
        "optim.grad_clip_warmup_steps=4",
        "model.attention.qk_norm=true",
        "model.logit_z_loss=1e-4",
    )
    rows = train_rows(run)
    assert [r["samples"] for r in rows] == [8, 16, 40, 48, 56, 64]
    assert [round(r["grad_clip"], 4) for r in rows] == [0.1, 0.325, 0.55, 0.775, 1.0, 1.0]  # stabilisers run too


def test_no_false_alarm_on_a_clean_300_step_run(tmp_path):
    run = tmp_path / "clean"
    train(run, "trainer.max_steps=300", "trainer.eval_interval=0", "logging=none")
    assert [e for e in events(run) if e["kind"] not in ("resume",)] == []
    assert not (run / "spikes").exists()


def test_wandb_run_resumes_under_the_same_id_with_group_and_tags(tmp_path):
    run = tmp_path / "run"
    common = ("trainer.max_steps=4", "trainer.eval_interval=0", "logging=wandb", "logging.group=ablation-7")
    train(run, *common, "trainer.stop_at=2")
    train(run, *common, "trainer.resume=auto")
    files = find_run_files(run)
    deadline = time.time() + 60  # under load W&B's service may still be writing the offline file after finish()
    while time.time() < deadline and any(read_run(f).run_id is None for f in files):
        time.sleep(0.5)
    parts = [read_run(f) for f in files]
    assert len(files) == 2 and parts[0].run_id == parts[1].run_id
    assert parts[1].group == "ablation-7" and "model=baseline" in parts[1].tags
    assert sorted(r["_step"] for p in parts for r in p.history if "loss" in r) == [1, 2, 3, 4]


def test_rollback_and_forensics_on_two_ranks_under_zero2(tmp_path):
    run = tmp_path / "run"
    train(
        run,
        *DETECT,
        "engine=zero2",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=24",
        "trainer.ckpt_interval=10",
        "monitor.inject.step=16",
        "monitor.inject.kind=poison",
        "monitor.response=rollback",
        "monitor.rollback_skip_batches=2",
        nproc=2,
    )
    assert {e["step"] for e in events(run, "spike")} == {16}
    rb = events(run, "rollback")
    assert [(e["step"], e["from_step"], e["skip_batches"]) for e in rb] == [(10, 16, [14, 16])]
    batch = json.loads((run / "spikes/16/batch.json").read_text())
    assert batch["positions"] == list(range(15 * 8, 16 * 8))  # both ranks' rows of global batch 15
    assert (run / "spikes/16/report.md").read_text().startswith("# Spike at step 16: data")
    assert [r["step"] for r in train_rows(run)] == list(range(1, 25))
