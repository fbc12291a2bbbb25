"""trainer.ckpt_async=true: the step waits only for the copy to host memory, a background writer does the rest, the
manifest comes after every file is on disk; the numbers equal synchronous checkpoints'; a process killed while
the writer runs resumes exactly from the checkpoint before; checkpoint I/O in the metrics."""

import json
import signal
import time

import pytest

from bench.ckpt_async import _run, losses
from stabletrain import checkpoint
from tests.helpers import read_jsonl, train, train_rows

pytestmark = pytest.mark.slow

COMMON = ["trainer.max_steps=12", "trainer.ckpt_interval=4", "trainer.eval_interval=0", "logging=none"]


def test_asynchronous_checkpoints_are_complete_verified_and_resume_like_synchronous_ones(tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    train(sync, *COMMON)
    train(asyn, *COMMON, "trainer.ckpt_async=true")
    for tag in ("step_00000008", "step_00000012"):  # keep_checkpoints=2: step 4 was pruned after 12 completed
        tag_dir = asyn / "checkpoints" / tag
        assert checkpoint.verify(tag_dir) is None
        listed = set(json.loads((tag_dir / checkpoint.MANIFEST).read_text())["files"])
        assert listed == {p.name for p in tag_dir.iterdir() if p.name != checkpoint.MANIFEST}
    assert not (asyn / "checkpoints/step_00000004").exists()
    assert [r["loss"] for r in train_rows(asyn)] == [r["loss"] for r in train_rows(sync)]
    rows = read_jsonl(asyn / "metrics.jsonl")
    blocking = {r["step"]: r["ckpt/blocking_s"] for r in rows if "ckpt/blocking_s" in r}
    done = {r["ckpt/completed_step"]: r for r in rows if "ckpt/completed_step" in r}
    assert sorted(blocking) == sorted(done) == [4, 8, 12] and all(r["ckpt/bytes"] > 0 for r in done.values())
    assert all(done[s]["ckpt/save_s"] >= blocking[s] for s in blocking)
    sync_rows = [r for r in read_jsonl(sync / "metrics.jsonl") if "ckpt/save_s" in r]
    assert [r["step"] for r in sync_rows] == [4, 8, 12] and all(r["ckpt/bytes"] > 0 for r in sync_rows)
    train(asyn, *COMMON[1:], "trainer.max_steps=14", "trainer.ckpt_async=true", "trainer.resume=auto")
    train(sync, *COMMON[1:], "trainer.max_steps=14", "trainer.resume=auto")
    assert [r["loss"] for r in train_rows(asyn)] == [r["loss"] for r in train_rows(sync)]
    assert any("ckpt/load_s" in r for r in read_jsonl(asyn / "metrics.jsonl"))


def test_a_kill_during_the_background_write_resumes_exactly(tmp_path):
    """The writer is slowed so that SIGKILL lands mid-write: that tag has no manifest, resume=auto takes the one
    before, and the resumed run's per-step losses equal an uninterrupted run's (bench/ckpt_async.py kill: 10 of 10)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _run(ref, "trainer.max_steps=12") == 0
    status = _run(run, "trainer.max_steps=12", delay=0.5, kill_after=time.time() + 0.5)
    assert status == -signal.SIGKILL
    assert any((run / "checkpoints").glob("step_*/SAVE_IN_PROGRESS"))  # killed while a save was in flight
    assert _run(run, "trainer.max_steps=12", "trainer.resume=auto") == 0
    assert losses(run) == losses(ref)
