"""End-to-end runs of train.py on the bundled corpus, as a user types them."""

import shutil

import numpy as np
import pytest

from stabletrain.analysis.wandb_offline import read_run
from tests.helpers import REPO, read_jsonl, train, train_rows, val_rows

pytestmark = pytest.mark.slow

STEPS = 150


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    proc = train(run_dir, f"trainer.max_steps={STEPS}", "trainer.eval_interval=50", "trainer.ckpt_interval=75")
    return run_dir, proc


def unigram_entropy_nats() -> float:
    """Entropy of the training tokens' unigram distribution: what a model with no context can reach."""
    from stabletrain.data.build import build_data
    from tests.helpers import compose_data

    tokens = build_data(compose_data(["data.seq_len=64"]), seed=0, is_main=True).train.tokens  # the run's cache
    counts = np.bincount(np.asarray(tokens))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_run_learns_below_unigram_entropy(baseline_run):
    run_dir, proc = baseline_run
    vals = val_rows(run_dir)
    assert [r["step"] for r in vals] == [0, 50, 100, 150]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 1.5
    assert vals[-1]["val_loss"] < unigram_entropy_nats()
    assert f"run directory: {run_dir}" in proc.stdout


def test_run_directory_contract(baseline_run):
    run_dir, _ = baseline_run
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "checkpoints/latest", "wandb"):
        assert (run_dir / name).exists(), name
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in rows), key
    assert rows[-1]["tokens"] == STEPS * 8 * 64
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000075", "step_00000150"]


def test_wandb_offline_run_mirrors_metrics(baseline_run):
    run_dir, _ = baseline_run
    wb = read_run(run_dir)
    logged = {r["_step"]: r["loss"] for r in wb.history if "loss" in r}
    ours = {r["step"]: r["loss"] for r in train_rows(run_dir)}
    assert logged == ours
    assert wb.config["model"]["d_model"] == 64
    assert wb.name == run_dir.name and "model=baseline" in wb.tags and "engine=zero0" in wb.tags


def test_resume_gives_identical_losses(tmp_path):
    """2k steps straight == k steps, interrupted, then trainer.resume=auto for k more (fp32)."""
    k = 6
    common = (f"trainer.max_steps={2 * k}", "trainer.ckpt_interval=100", "trainer.eval_interval=0", "logging=none")
    train(tmp_path / "straight", *common)
    train(tmp_path / "split", *common, f"trainer.stop_at={k}")
    assert [r["step"] for r in train_rows(tmp_path / "split")] == list(range(1, k + 1))
    proc = train(tmp_path / "split", *common, "trainer.resume=auto")
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / f'step_{k:08d}'}" in proc.stdout
    straight, split = train_rows(tmp_path / "straight"), train_rows(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 2 * k + 1))
    for key in ("loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in split] == [r[key] for r in straight], key
    events = read_jsonl(tmp_path / "split" / "events.jsonl")
    assert events[-1]["kind"] == "resume" and events[-1]["step"] == k


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=2", "logging=none", "trainer.eval_interval=0")
    proc = train(tmp_path / "run", "trainer.max_steps=2", "logging=none", check=False)
    assert proc.returncode == 2
    assert "already holds checkpoints: pass trainer.resume=auto" in proc.stderr.strip().splitlines()[-1]
    assert len(train_rows(tmp_path / "run")) == 2  # the first run's metrics are untouched


def test_resume_auto_with_an_empty_checkpoint_directory_starts_fresh(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = train(tmp_path / "run", "trainer.max_steps=2", "trainer.resume=auto", "logging=none")
    assert "no checkpoint in" in proc.stdout and "starting fresh" in proc.stdout
    event = read_jsonl(tmp_path / "run" / "events.jsonl")[0]
    assert event["kind"] == "resume" and event["checkpoint"] is None
    assert train_rows(tmp_path / "run")[0]["step"] == 1


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    run = tmp_path / "run"
    train(run, "trainer.max_steps=4", "trainer.ckpt_interval=2", "logging=none", "trainer.eval_interval=0")
    newest = run / "checkpoints" / "step_00000004"
    weights = newest / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = train(
        run,
        "trainer.max_steps=6",
        "trainer.ckpt_interval=2",
        "logging=none",
        "trainer.eval_interval=0",
        "trainer.resume=auto",
    )
    assert "skipping checkpoint step_00000004: mp_rank_00_model_states.pt: truncated or resized file" in proc.stdout
    resume = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "resume"][-1]
    assert resume["checkpoint"].endswith("step_00000002") and resume["step"] == 2
    assert resume["rejected"][0][0] == "step_00000004"
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3, 4, 5, 6]


def test_corrupt_newest_checkpoint_of_the_right_size_falls_back(tmp_path):
    run = tmp_path / "run"
    common = ("trainer.ckpt_interval=2", "logging=none", "trainer.eval_interval=0")
    train(run, "trainer.max_steps=4", *common)
    weights = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)  # same size, zeroed bytes inside the archive
    weights.write_bytes(bytes(data))
    proc = train(run, "trainer.max_steps=6", *common, "trainer.resume=auto")
    assert "skipping checkpoint step_00000004: mp_rank_00_model_states.pt: checksum mismatch" in proc.stdout
    resume = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "resume"][-1]
    assert resume["checkpoint"].endswith("step_00000002")
    # With every checkpoint unreadable the run stops with one line instead of training from half-loaded state.
    (run / "checkpoints" / "step_00000006" / "COMPLETE.json").unlink()
    for f in (run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"):
        f.write_bytes(bytes(f.stat().st_size))
    proc = train(run, "trainer.max_steps=8", *common, "trainer.resume=auto", check=False)
    assert proc.returncode == 2 and "could be loaded" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "data.source.train_files=[/nonexistent/corpus.jsonl]",
            "data.source.train_files: file not found: /nonexistent/corpus.jsonl",
        ),
        ("data.source.text_field=body", "no field 'body'"),
    ],
)
def test_bad_data_input_is_one_line(tmp_path, override, needle):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    # A private tokenizer path so the bad text field is met while training the tokenizer, not from a cache.
    proc = train(
        run,
        "trainer.max_steps=2",
        "logging=none",
        override,
        f"data.tokenizer.path={tmp_path / 'tok' / 'sp.model'}",
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("stabletrain: error:") and needle in lines[-1]
    assert "Traceback" not in proc.stderr


def test_zero_offload_trains(tmp_path):
    train(
        tmp_path / "run",
        "engine=zero2",
        "engine.offload_optimizer=cpu",
        "trainer.max_steps=4",
        "logging=none",
        "trainer.eval_interval=0",
    )
    assert len(train_rows(tmp_path / "run")) == 4


def test_bf16_trains(tmp_path):
    train(
        tmp_path / "run",
        "precision=bf16",
        "engine=zero1",
        "trainer.max_steps=8",
        "logging=none",
        "trainer.eval_interval=0",
    )
    vals = val_rows(tmp_path / "run")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5


def test_multirun_sweep_in_one_process(tmp_path):
    import subprocess

    from tests.helpers import PYTHON, TINY, env

    proc = subprocess.run(
        [
            PYTHON,
            "train.py",
            "-m",
            *TINY,
            "trainer.max_steps=2",
            "logging=none",
            "optim.lr=1e-3,3e-3",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert len(train_rows(tmp_path / job)) == 2
    lrs = [[r["lr"] for r in train_rows(tmp_path / job)] for job in ("0", "1")]
    assert lrs[0] == [1e-3 * 0.5, 1e-3] and lrs[1] == [3e-3 * 0.5, 3e-3]  # each job got its own optim.lr


def test_compiled_blocks_train_like_eager(tmp_path):
    """trainer.compile=true (torch.compile per block) follows the eager run's losses."""
    common = ("trainer.max_steps=4", "trainer.eval_interval=0", "logging=none")
    train(tmp_path / "eager", *common)
    train(tmp_path / "compiled", *common, "trainer.compile=true", timeout=600)
    eager, compiled = train_rows(tmp_path / "eager"), train_rows(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    # The compile's warm-up, reported once: the first step's time less the second's.
    assert [r["step"] for r in compiled if "perf/compile_s" in r] == [2] and "perf/compile_s" not in eager[1]
    assert compiled[1]["perf/compile_s"] == pytest.approx(compiled[0]["step_time_s"] - compiled[1]["step_time_s"])
