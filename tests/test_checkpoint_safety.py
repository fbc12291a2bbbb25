"""Checkpoints that execute no code and prove their integrity; a resume that refuses what it cannot use;
non-finite state never stored; torn logs mended; clean signals (issue 11)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stabletrain import checkpoint
from stabletrain.checkpoint import safe_load
from tests.helpers import PYTHON, REPO, TINY, env, read_jsonl, train, train_rows

COMMON = ("trainer.ckpt_interval=2", "logging=none", "trainer.eval_interval=0", "trainer.keep_checkpoints=3")


class Gadget:
    """What a hostile checkpoint plants: unpickling it would create `marker` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by one holding a gadget and rewrite the manifest to match, as an attacker
    with write access to the run directory would (so the digest check alone cannot catch it)."""
    torch.save({"module": {"w": torch.zeros(2)}, "x": Gadget(marker)}, path)
    manifest = path.parent / checkpoint.MANIFEST
    m = json.loads(manifest.read_text())
    m["files"][path.name] = {"bytes": path.stat().st_size, checkpoint.DIGEST: checkpoint.file_digest(path)}
    manifest.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory):
    """4 fp32 ZeRO-1 steps with checkpoints at 2 and 4: model states, optimizer states and RNG files."""
    run = tmp_path_factory.mktemp("zero1") / "run"
    train(run, "engine=zero1", "trainer.max_steps=4", *COMMON)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model_states", "optim_states", "rng_rank0", "state_rank0"])
def test_a_planted_pickle_gadget_is_refused_and_never_runs(zero1_run, tmp_path, kind):
    import shutil

    tag = tmp_path / "step_00000004"
    shutil.copytree(zero1_run / "checkpoints" / "step_00000004", tag)
    marker = tmp_path / "PWNED"
    if kind == "state_rank0":  # per-rank state (expert-parallel experts): add the file to the checkpoint
        (tag / "state_rank0.pt").write_bytes(b"")
    (target,) = [p for p in tag.glob("*.pt") if kind in p.name]
    plant(target, marker)
    rejection = checkpoint.verify(tag)  # the scan reads the pickle's opcodes, it does not run them
    assert rejection is not None and rejection.file == target.name and "would import" in rejection.reason
    assert "pathlib" in rejection.reason
    # Every loader refuses the file on its own too (a file swapped after the check):
    with pytest.raises(safe_load.UnsafeCheckpoint, match=target.name):
        safe_load.load(target)
    with pytest.raises(safe_load.UnsafeCheckpoint):
        with safe_load.weights_only_loading():
            torch.load(target, weights_only=False)  # what DeepSpeed's and zero_to_fp32's loaders pass
    with pytest.raises(safe_load.UnsafeCheckpoint):
        safe_load.SafeCheckpointEngine.load(None, str(target))
    if kind == "model_states":  # what spike forensics reads from the previous checkpoint
        with pytest.raises(safe_load.UnsafeCheckpoint):
            checkpoint.model_weights(tag)
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_checkpoint_types_load_under_the_allowlist(zero1_run):
    tag = zero1_run / "checkpoints" / "step_00000004"
    assert checkpoint.verify(tag) is None
    for f in tag.glob("*.pt"):
        assert safe_load.refusal(f) is None, f
        safe_load.load(f)


@pytest.mark.slow
def test_gadget_in_the_newest_checkpoint_falls_back_and_an_explicit_path_fails(zero1_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(zero1_run, run)
    marker = tmp_path / "PWNED"
    plant(run / "checkpoints/step_00000004/mp_rank_00_model_states.pt", marker)
    proc = train(run, "engine=zero1", "trainer.max_steps=5", *COMMON, "trainer.resume=auto")
    assert "skipping checkpoint step_00000004: mp_rank_00_model_states.pt would import" in proc.stdout
    rejected = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "checkpoint_rejected"]
    assert rejected[-1]["file"] == "mp_rank_00_model_states.pt" and "would import" in rejected[-1]["reason"]
    assert [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "resume"][-1]["step"] == 2
    # Named explicitly, the same checkpoint is a one-line error.
    explicit = tmp_path / "explicit"
    shutil.copytree(zero1_run, explicit)
    plant(explicit / "checkpoints/step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    proc = train(
        tmp_path / "other",
        "engine=zero1",
        "trainer.max_steps=5",
        *COMMON,
        f"trainer.resume={explicit / 'checkpoints/step_00000004'}",
        check=False,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        last.startswith("stabletrain: error: trainer.resume=") and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in last
    )
    assert not marker.exists()


@pytest.mark.slow
def test_flipped_byte_is_rejected_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """The newest checkpoint's largest file gets one flipped byte (same size); a torn line ends metrics.jsonl.
    resume=auto rejects the checkpoint by its digest, resumes from the previous one, mends the log, and the
    losses after the resume equal those of a run that was never interrupted."""
    args = ("trainer.max_steps=6", *COMMON)
    train(tmp_path / "straight", *args)
    run = tmp_path / "split"
    train(run, *args, "trainer.stop_at=4")
    tag = run / "checkpoints" / "step_00000004"
    largest = max(tag.glob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.2, "lr"')  # a crash in the middle of a write
    proc = train(run, *args, "trainer.resume=auto")
    assert f"skipping checkpoint step_00000004: {largest.name}: checksum mismatch" in proc.stdout
    assert "metrics.jsonl: dropped a torn final line" in proc.stdout
    rejected = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "checkpoint_rejected"]
    assert rejected and rejected[0]["file"] == largest.name and "checksum" in rejected[0]["reason"]
    straight, split = train_rows(tmp_path / "straight"), train_rows(run)
    assert [r["step"] for r in split] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in split] == [r[key] for r in straight], key


@pytest.mark.slow
def test_manifest_records_a_digest_for_every_file(zero1_run):
    tag = zero1_run / "checkpoints" / "step_00000004"
    files = json.loads((tag / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {p.name for p in tag.iterdir() if p.name != checkpoint.MANIFEST}
    assert set(files) == on_disk
    for name, entry in files.items():
        assert entry == {"bytes": (tag / name).stat().st_size, "xxh3_128": checkpoint.file_digest(tag / name)}


@pytest.mark.slow
def test_nonfinite_state_is_never_checkpointed(zero1_run, tmp_path):
    """The audit's case: a corrupted (NaN) ZeRO-1 optimizer state loaded on resume. The first step is NaN; the
    run stops with one line instead of stepping on and checkpointing NaN weights, and the old checkpoints stay."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(zero1_run, run)
    optim = run / "checkpoints/step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    partition = state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    with torch.no_grad():
        partition[0] = float("nan")
    torch.save(state, optim)
    m = json.loads((optim.parent / checkpoint.MANIFEST).read_text())
    m["files"][optim.name] = {"bytes": optim.stat().st_size, checkpoint.DIGEST: checkpoint.file_digest(optim)}
    (optim.parent / checkpoint.MANIFEST).write_text(json.dumps(m))
    proc = train(run, "engine=zero1", "trainer.max_steps=8", *COMMON, "trainer.resume=auto", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds NaN/Inf; refusing to write a checkpoint" in last and "step_00000004" in last
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "checkpoint_refused"]


def test_first_nonfinite_names_the_tensor():
    from stabletrain.optim import first_nonfinite

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert first_nonfinite(model, opt) is None
    opt.state[model.bias]["exp_avg_sq"][0] = float("inf")
    assert first_nonfinite(model, opt) == "optimizer state exp_avg_sq of bias"
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert first_nonfinite(model, opt) == "weight weight"


def test_forensics_plot_tolerates_nonfinite_history(tmp_path):
    from stabletrain.monitoring.forensics import _plot
    from stabletrain.training.detectors import Firing, StepResult

    history = [(s, float("nan"), float("inf"), True) for s in range(1, 6)]
    result = StepResult(5, float("nan"), float("inf"), firings=[Firing("nonfinite", "loss", "nonfinite", float("nan"))])
    now = {"per_seq_loss": [float("nan")] * 2, "grad_norm_by_block": {"blocks.0": float("inf")}}
    _plot(history, result, now, None, tmp_path / "spike.png")
    assert (tmp_path / "spike.png").stat().st_size > 0


# ------------------------------------------------------------------ signals
def _start(run: Path, *overrides: str) -> subprocess.Popen:
    args = [
        *TINY,
        "trainer.max_steps=10000",
        "trainer.ckpt_interval=0",
        "trainer.eval_interval=0",
        "logging=none",
        f"hydra.run.dir={run}",
        *overrides,
    ]
    return subprocess.Popen(
        [PYTHON, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(train_rows(run)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_exits_with_its_status(tmp_path, sig, status):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_steps(run, proc, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = train_rows(run)[-1]["step"]
    assert f"stopped by {signal.Signals(sig).name} at step {step}" in out
    assert "final val_loss" not in out
    assert (run / "checkpoints" / checkpoint.tag_for(step) / checkpoint.MANIFEST).is_file()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    run = tmp_path / "run"
    # A slow step (bigger model) so that both signals land inside one step.
    proc = _start(run, "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "data.seq_len=256")
    _wait_for_steps(run, proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("stabletrain: aborted by Ctrl-C at step")
    assert "Traceback" not in err
