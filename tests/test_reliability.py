"""Reliability, third campaign (issue 24): integrity that fails closed, damage never mistaken for a fresh start, a
full disk said in one line, the tools as strict as training, no silent former entry points, and what had not been
tried: ZeRO-3 and pipeline checkpoints damaged, SIGTERM to one rank, SLURM preemption onto a corrupt checkpoint,
random byte flips."""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from stabletrain import StableTrainError, checkpoint
from stabletrain.checkpoint import safe_load, space
from stabletrain.cli.interop import EvaluateArgs, ExportArgs, GenerateArgs, evaluate_main, export_main, generate_main
from stabletrain.config import ConfigError, check_overrides, validate
from stabletrain.distributed import free_port
from tests.helpers import PYTHON, REPO, TINY, composed, env, read_jsonl, train, train_jobs, train_rows
from tests.test_checkpoint_safety import plant

ARGS = ("trainer.max_steps=30", "trainer.ckpt_interval=10", "trainer.keep_checkpoints=0", "trainer.eval_interval=0",
        "logging=none")  # fmt: skip
MODEL = "mp_rank_00_model_states.pt"
PACKAGE = REPO / "stabletrain"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One uninterrupted 30-step run with checkpoints at 10, 20 and 30: the material and the reference."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(run, *ARGS)
    return run


def copy_run(src: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def flip(path: Path, offset: int | None = None, n: int = 1) -> None:
    """XOR n bytes at offset (default: the middle) with 0xFF; the size stays the same."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run)}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == kind]


def strip_digests(tag: Path) -> None:
    """The manifest of an older stabletrain: sizes only."""
    manifest = tag / checkpoint.MANIFEST
    m = json.loads(manifest.read_text())
    m.pop("digest")
    for entry in m["files"].values():
        entry.pop(checkpoint.DIGEST)
    manifest.write_text(json.dumps(m))


# ---------------------------------------------------------------- 1. integrity fails closed
@pytest.mark.slow
def test_a_manifest_without_digests_is_refused_and_the_run_falls_back(base, tmp_path):
    """The audit's case: digests removed from the manifest, 4 KiB flipped in the model file. It was 'resumed from
    step 30' with garbage; now the checkpoint is rejected for its manifest and the run resumes exactly from 20."""
    run = copy_run(base, tmp_path)
    tag = run / "checkpoints" / "step_00000030"
    strip_digests(tag)
    flip(tag / MODEL, n=4096)
    assert checkpoint.verify(tag).file == checkpoint.MANIFEST
    proc = train(run, *ARGS, "trainer.resume=auto", "trainer.stop_at=21")
    assert "skipping checkpoint step_00000030: COMPLETE.json: the manifest records no xxh3_128 digest" in proc.stdout
    rejected = events(run, "checkpoint_rejected")
    assert rejected[-1]["file"] == checkpoint.MANIFEST and "accept_legacy_checkpoints" in rejected[-1]["reason"]
    assert events(run, "resume")[-1]["step"] == 20
    assert losses(run) == {s: v for s, v in losses(base).items() if s <= 21}


@pytest.mark.slow
def test_legacy_checkpoints_are_used_only_when_accepted_with_a_warning(base, tmp_path):
    run = copy_run(base, tmp_path)
    tag = run / "checkpoints" / "step_00000030"
    strip_digests(tag)
    m = json.loads((tag / checkpoint.MANIFEST).read_text())
    m["digest"], m["files"][MODEL][checkpoint.DIGEST] = checkpoint.DIGEST, checkpoint.file_digest(tag / MODEL)
    (tag / checkpoint.MANIFEST).write_text(json.dumps(m))  # one file without its digest is enough to refuse it
    assert "no xxh3_128 digest for rng_rank0.pt" in checkpoint.verify(tag).reason
    assert checkpoint.verify(tag, accept_legacy=True) is None
    proc = train(run, *ARGS, "trainer.resume=auto", "trainer.accept_legacy_checkpoints=true")
    assert f"resumed from {tag}" in proc.stdout and "already finished at step 30" in proc.stdout
    assert "warning: step_00000030 has a manifest without digests" in proc.stdout
    assert events(run, "checkpoint_legacy")[-1]["checkpoint"] == str(tag)
    # The tools refuse it too, unless told the same.
    with pytest.raises(StableTrainError, match="no xxh3_128 digest"):
        checkpoint_of(run, step=30)
    assert checkpoint_of(run, step=30, accept_legacy=True) == tag


def checkpoint_of(run: Path, **kw) -> Path:
    from stabletrain.interop.run import find_checkpoint

    return find_checkpoint(run, **kw)


# ---------------------------------------------------------------- 2. damage is never a fresh start
@pytest.mark.slow
def test_checkpoints_without_manifests_are_an_error_never_a_fresh_start(base, tmp_path):
    run = copy_run(base, tmp_path)
    for manifest in (run / "checkpoints").glob("step_*/COMPLETE.json"):
        manifest.unlink()
    before = {p: p.stat().st_size for p in run.rglob("*") if p.is_file()}
    metrics = (run / "metrics.jsonl").read_text()
    proc = train(run, *ARGS, "trainer.resume=auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith("stabletrain: error: no checkpoint in") and "could be loaded" in line
    for step in (10, 20, 30):
        assert f"step_{step:08d}: no completeness manifest" in line
    assert "starting fresh" not in proc.stdout
    assert (run / "metrics.jsonl").read_text() == metrics
    assert {p: p.stat().st_size for p in before} == before and not (run / "checkpoints" / "step_00000000").exists()


@pytest.mark.slow
def test_an_interrupted_save_blocks_nothing(base, tmp_path):
    """A save killed midway leaves its tag with the in-progress marker and no manifest: skipped in favour of an
    older complete checkpoint; when it was the run's very first save, a fresh start loses nothing."""
    run = copy_run(base, tmp_path)
    tag = run / "checkpoints" / "step_00000030"
    (tag / checkpoint.MANIFEST).unlink()
    (tag / checkpoint.SAVE_MARKER).write_text("")
    proc = train(run, *ARGS, "trainer.resume=auto", "trainer.stop_at=21")
    assert "skipping checkpoint step_00000030: the save of this checkpoint was interrupted" in proc.stdout
    assert events(run, "resume")[-1]["step"] == 20 and losses(run)[21] == losses(base)[21]

    first = tmp_path / "first"
    shutil.copytree(base / "checkpoints" / "step_00000010", first / "checkpoints" / "step_00000010")
    (first / "checkpoints" / "step_00000010" / checkpoint.MANIFEST).unlink()
    (first / "checkpoints" / "step_00000010" / checkpoint.SAVE_MARKER).write_text("")
    proc = train(first, "trainer.max_steps=2", "trainer.eval_interval=0", "logging=none", "trainer.resume=auto")
    assert "interrupted first save" in proc.stdout and "starting fresh" in proc.stdout
    assert [r["step"] for r in train_rows(first)] == [1, 2]
    assert sorted(p.name for p in (first / "checkpoints").glob("step_*")) == ["step_00000002"]


class DiesMidway:
    """An engine whose save is killed after its first file."""

    def save_checkpoint(self, root, tag, client_state):
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        raise KeyboardInterrupt


def test_a_save_killed_midway_leaves_its_marker_and_no_manifest(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(DiesMidway(), tmp_path, 10, {}, keep=2)
    tag = tmp_path / "step_00000010"
    assert (tag / checkpoint.SAVE_MARKER).is_file() and not (tag / checkpoint.MANIFEST).exists()
    assert checkpoint.check(tag).interrupted
    (tag / checkpoint.SAVE_MARKER).unlink()  # no marker and no manifest: lost or deleted, not an interrupted save
    rejection = checkpoint.check(tag)
    assert not rejection.interrupted and "no completeness manifest" in rejection.reason


# ---------------------------------------------------------------- 3. a full disk
@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_resume_stays_exact(base, tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    run = copy_run(base, tmp_path)
    for step in (20, 30):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    tag10 = run / "checkpoints" / "step_00000010"
    needed = sum(p.stat().st_size for p in tag10.iterdir() if p.name != checkpoint.MANIFEST)
    original = TorchCheckpointEngine.save

    def disk_fills(self, state_dict, path):
        if "step_00000020" in str(path):
            Path(path).write_bytes(bytes(4096))  # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", disk_fills)
    monkeypatch.setattr(space, "free_bytes", lambda path: 1 << 20)  # 1 MiB: less than a checkpoint takes
    proc = train(run, *ARGS, "trainer.resume=auto", "trainer.stop_at=20", check=False)
    assert proc.returncode == space.NO_SPACE_STATUS == 28, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("stabletrain: error: no space left on the device")
    assert str(run / "checkpoints") in line and "step 20" in line and f"{needed:,} bytes" in line
    assert "removed the partial step_00000020" in line and "step_00000010" in line
    assert "warning: low disk space" in proc.stdout
    low = events(run, "disk_space_low")
    assert low and low[-1]["step"] == 20 and low[-1]["free_bytes"] == 1 << 20 and low[-1]["checkpoint_bytes"] == needed
    assert events(run, "checkpoint_failed")[-1]["step"] == 20
    assert not (run / "checkpoints" / "step_00000020").exists()
    assert checkpoint.verify(tag10) is None
    monkeypatch.undo()
    train(run, *ARGS, "trainer.resume=auto", "trainer.stop_at=21")
    assert events(run, "resume")[-1]["step"] == 10
    assert losses(run) == {s: v for s, v in losses(base).items() if s <= 21}


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_write_failures_are_told_apart(tmp_path, monkeypatch):
    """torch reports a full disk mid-file as '[enforce fail ...] unexpected pos' (no errno): what /dev/full gives."""
    with pytest.raises(RuntimeError) as torch_error:
        torch.save({"w": torch.zeros(10000)}, "/dev/full")
    monkeypatch.setattr(space, "free_bytes", lambda path: 0)
    full = space.write_failure(torch_error.value, tmp_path, 20, 5000, "step_00000010", 100)
    assert isinstance(full, space.DiskFull) and full.exit_status == 28 and "\n" not in str(full)
    assert "no space left on the device" in str(full) and "5,000 bytes" in str(full)
    monkeypatch.setattr(space, "free_bytes", lambda path: 10 << 30)
    other = space.write_failure(torch_error.value, tmp_path, 20, 5000, "step_00000010", 100)
    assert type(other) is space.CheckpointWriteFailed and other.exit_status == space.IO_ERROR_STATUS
    assert "unexpected pos" in str(other) and "\n" not in str(other)
    enospc = space.write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 20, None, None, 4096)
    assert isinstance(enospc, space.DiskFull) and "more than the 4,096 bytes written" in str(enospc)


# ---------------------------------------------------------------- 4. the tools are as strict as training
def _tool(main, argv, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow
def test_the_tools_name_the_checkpoint_they_refused_and_why(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    ckpts = run / "checkpoints"
    flip(ckpts / "step_00000030" / MODEL)
    skip = "stabletrain: warning: skipping checkpoint step_00000030: mp_rank_00_model_states.pt: checksum mismatch"
    status, out, err = _tool(export_main, [run, f"out={tmp_path / 'e'}", "format=safetensors"], capsys)
    assert status == 0 and "exported step 20" in out and err.count("\n") == 1, err
    assert err.startswith(skip) and err.rstrip().endswith("; using step_00000020"), err
    status, out, err = _tool(generate_main, [run, "prompt=ROMEO:", "max_new_tokens=2"], capsys)
    assert status == 0 and skip in err
    status, _, err = _tool(evaluate_main, [run, "step=30", "max_docs=1"], capsys)
    assert status == 2 and err.count("\n") == 1 and "step_00000030" in err and "checksum mismatch" in err, err
    plant(ckpts / "step_00000020" / "rng_rank0.pt", tmp_path / "PWNED")
    (ckpts / "step_00000010" / checkpoint.MANIFEST).unlink()
    for step, why in ((20, "rng_rank0.pt would import"), (10, "no completeness manifest")):
        status, _, err = _tool(export_main, [run, f"out={tmp_path / 'x'}", f"step={step}"], capsys)
        assert status == 2 and err.count("\n") == 1 and why in err, err
    status, _, err = _tool(export_main, [run, f"out={tmp_path / 'x'}"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "checksum mismatch" in err and "would import" in err and "no completeness manifest" in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_forensics_verifies_the_previous_checkpoint_and_says_what_it_skipped(base, tmp_path, capsys):
    from stabletrain.monitoring.forensics import _previous_weights

    run = copy_run(base, tmp_path)
    flip(run / "checkpoints" / "step_00000030" / MODEL)
    tag, weights = _previous_weights(run / "checkpoints", 31)
    assert tag.name == "step_00000020" and "embed.weight" in weights
    err = capsys.readouterr().err
    assert "forensics: skipping checkpoint step_00000030: mp_rank_00_model_states.pt: checksum mismatch" in err


# ---------------------------------------------------------------- 5. bad input, for the tools and the config
TOOL_CASES = [
    (generate_main, ["max_new_tokens=-1"], "max_new_tokens=-1 must be >= 1"),
    (generate_main, ["max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
    (generate_main, ["temperature=-1"], "temperature=-1.0 must be >= 0"),
    (generate_main, ["temperature=nan"], "temperature=nan must be finite and >= 0"),
    (generate_main, ["top_p=2"], "top_p=2.0 must be > 0 and <= 1"),
    (generate_main, ["top_p=0"], "top_p=0.0 must be > 0 and <= 1"),
    (generate_main, ["seed=-3"], "seed=-3 must be >= 0 and <= 4.29497e+09"),
    (evaluate_main, ["max_docs=0"], "max_docs=0 must be >= 1"),
    (evaluate_main, ["step=-1"], "step=-1 must be >= 0"),
    (export_main, ["out=somewhere", "step=-1"], "step=-1 must be >= 0"),
    (export_main, ["out=somewhere", "dtype=fp16"], "dtype=fp16: expected one of fp32, bf16"),
    (export_main, ["out=somewhere", "format=onnx"], "format=onnx: expected one of hf, safetensors"),
    (generate_main, ["max_new_tokens=many"], "max_new_tokens=many: expected an integer"),
    (evaluate_main, ["accept_legacy_checkpoints=maybe"], "accept_legacy_checkpoints=maybe: expected true or false"),
]


@pytest.mark.parametrize("main, argv, needle", TOOL_CASES, ids=[f"{m.__name__}-{a[-1]}" for m, a, _ in TOOL_CASES])
def test_tool_arguments_out_of_range_are_one_line_and_exit_2(main, argv, needle, tmp_path, capsys):
    status, out, err = _tool(main, [tmp_path / "no_such_run", *argv], capsys)  # checked before the run is read
    assert status == 2 and err == f"stabletrain: error: {needle}\n", err


def test_every_number_a_tool_takes_declares_its_range():
    for cls in (ExportArgs, GenerateArgs, EvaluateArgs):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}:
                assert "range" in f.metadata, f"{cls.__name__}.{f.name}"


def test_evaluation_of_no_documents_is_an_error_not_a_perfect_score(monkeypatch):
    from stabletrain.interop import evaluate as ev

    monkeypatch.setattr(ev, "documents", lambda cfg, max_docs: iter(()))
    with pytest.raises(StableTrainError, match="no validation documents to score"):
        ev.evaluate(None, composed().data, None, 0, progress=False)


def _config_error(*overrides: str) -> str | None:
    error = check_overrides(list(overrides), REPO / "conf")
    if error:
        return error
    try:
        validate(composed(*overrides))
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.step_milestones=[0.9,0.8]", "optim.step_milestones=[0.9, 0.8] must be strictly increasing"),
        ("optim.step_milestones=[0.5,0.5]", "optim.step_milestones=[0.5, 0.5] must be strictly increasing"),
        ("optim.step_milestones=[0,0.5]", "optim.step_milestones entry 0.0 (in [0.0, 0.5]) must be > 0 and <= 1"),
        ("optim.lr=inf", "optim.lr=inf must be finite and > 0"),
        ("optim.lr=nan", "optim.lr=nan must be finite and > 0"),
        ("monitor.inject.scale=inf", "monitor.inject.scale=inf must be finite"),
    ],
)
def test_config_values_the_audit_found_accepted_or_misdescribed(override, needle):
    schedule = ["optim.schedule=step", "optim.step_factors=[0.3,0.1]"] if "milestones" in override else []
    error = _config_error(*schedule, override)
    assert error is not None and needle in error and "\n" not in error, error


# ---------------------------------------------------------------- 6. no module runs as a program and does nothing
def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _has_main_block(path: Path) -> bool:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            return any(isinstance(n, ast.Call) for n in ast.walk(node))
    return False


def test_every_module_python_m_can_run_is_a_command_or_says_which_command_to_use():
    from stabletrain import commands

    command_names = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        message = commands.refusal(name)
        if _has_main_block(path):
            assert message is None, name
            command_names.add(name)
        else:
            assert message is not None and message.startswith("stabletrain: error: ") and "\n" not in message, name
    assert command_names == set(commands.commands())
    for old, new in commands.MOVED.items():
        assert commands.refusal(old).endswith(f"use python -m {new}") and new in command_names, old
    # Commands that once existed (git history of README.md and docs/) are commands or point to where they went.
    for old in ("stabletrain.data.prepare", "stabletrain.data.tokenizer", "stabletrain.data.corpus"):
        assert old in command_names or old in commands.MOVED, old
    shown = {m for doc in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
             for m in re.findall(r"python -m (stabletrain[\w.]*)", doc.read_text())}  # fmt: skip
    assert shown <= command_names, shown - command_names
    assert commands.refusal("pytest") is None and commands.refusal("stabletrain.no_such_module") is None


def test_a_former_entry_point_says_where_the_command_went(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "some text"}\n')
    out = tmp_path / "prepared"
    cmd = [PYTHON, "-m", "stabletrain.data.prepare", "data=local", f"data.path={corpus}", f"out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "stabletrain: error: stabletrain.data.prepare is a library module, not a command: use python -m "
        "stabletrain.cli.prepare"
    ]
    assert not out.exists()


# ---------------------------------------------------------------- 7. layouts and launchers not tried before
LAYOUT_ARGS = ["trainer.max_steps=6", "trainer.ckpt_interval=2", "trainer.keep_checkpoints=0",
               "trainer.eval_interval=0", "logging=none", "trainer.micro_batch_size=4"]  # fmt: skip
LAYOUTS = {"zero3": ["engine=zero3"], "pipe2": ["engine.pipeline_stages=2"]}


def damage_layout(src: str, dst: str, marker: str) -> None:
    """Run on rank 0 between two jobs of one torchrun launch: a copy of a finished run whose step-6 checkpoint has
    one flipped byte in its largest file and whose step-4 checkpoint holds a pickle gadget in rank 1's RNG file."""
    shutil.copytree(src, dst)
    ckpts = Path(dst) / "checkpoints"
    flip(max((ckpts / "step_00000006").glob("*.pt"), key=lambda p: p.stat().st_size))
    plant(ckpts / "step_00000004" / "rng_rank1.pt", Path(marker))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """2-rank ZeRO-3 and 2-stage pipeline runs, then each resumed from a damaged copy: one torchrun launch."""
    root = tmp_path_factory.mktemp("layouts")
    jobs = [(root / name, [*LAYOUT_ARGS, *extra]) for name, extra in LAYOUTS.items()]
    for name, extra in LAYOUTS.items():
        before = ["tests.test_reliability:damage_layout", str(root / name), str(root / f"{name}_damaged"),
                  str(root / "PWNED")]  # fmt: skip
        jobs.append((root / f"{name}_damaged", [*LAYOUT_ARGS, *extra, "trainer.resume=auto"], before))
    assert set(train_jobs(jobs, nproc=2).values()) == {0}
    return root


def _kinds(tag: Path) -> dict[str, Path]:
    """One file of each kind a checkpoint holds (the rank and layer numbers made generic)."""
    out = {}
    for p in sorted(tag.glob("*.pt")):
        out.setdefault(re.sub(r"\d+", "N", p.name), p)
    return out


# The files of each layout's checkpoint (rank and layer numbers made generic); consolidation (model_weights) reads
# the first set, resume reads them all.
KINDS = {
    "zero3": ({"zero_pp_rank_N_mp_rank_N_model_states.pt", "zero_pp_rank_N_mp_rank_N_optim_states.pt"},
              {"rng_rankN.pt"}),
    "pipe2": ({"layer_N-model_states.pt"}, {"mp_rank_N_model_states.pt", "rng_rankN.pt"}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_file_kind_of_zero3_and_pipeline_checkpoints_is_verified(layouts, layout, tmp_path):
    """Each kind of file: one flipped byte fails its digest, a planted gadget (manifest rewritten to match) fails
    the scan, and the files consolidation reads refuse the gadget on their own too; nothing runs."""
    tag = layouts / layout / "checkpoints" / "step_00000002"
    kinds = _kinds(tag)
    weights, others = KINDS[layout]
    assert set(kinds) == weights | others, sorted(kinds)
    marker = tmp_path / "PWNED"
    for kind, path in kinds.items():
        for how in ("flip", "gadget"):
            copy = tmp_path / f"{how}_{kind}" / tag.name
            shutil.copytree(tag, copy)
            if how == "flip":
                flip(copy / path.name)
                reason = "checksum mismatch"
            else:
                plant(copy / path.name, marker)
                reason = "would import"
            rejection = checkpoint.verify(copy)
            assert rejection is not None and rejection.file == path.name and reason in rejection.reason, (kind, how)
            if how == "gadget" and kind in weights:
                with pytest.raises(safe_load.UnsafeCheckpoint):
                    checkpoint.model_weights(copy)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_damaged_zero3_and_pipeline_checkpoints_fall_back_on_two_ranks_exactly(layouts, layout):
    run = layouts / f"{layout}_damaged"
    rejected = {Path(e["checkpoint"]).name: e for e in events(run, "checkpoint_rejected")}
    assert "checksum mismatch" in rejected["step_00000006"]["reason"]
    assert rejected["step_00000004"]["file"] == "rng_rank1.pt" and "would import" in rejected["step_00000004"]["reason"]
    assert events(run, "resume")[-1]["step"] == 2
    assert losses(run) == losses(layouts / layout) and sorted(losses(run)) == list(range(1, 7))
    assert not (layouts / "PWNED").exists()


def _workers(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_sigterm_to_one_rank_under_torchrun_checkpoints_and_every_rank_exits_143(tmp_path):
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"), *TINY,
           "trainer.max_steps=10000", "trainer.ckpt_interval=0", "trainer.eval_interval=0", "logging=none",
           "trainer.micro_batch_size=4", f"hydra.run.dir={run}"]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").is_file() and len(train_rows(run)) >= 2):
        assert time.time() < deadline and agent.poll() is None, agent.communicate()
        time.sleep(0.2)
    workers = _workers(agent.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one rank only, as a node-local OOM killer or a stray kill would
    out, err = agent.communicate(timeout=300)
    step = train_rows(run)[-1]["step"]
    assert f"stopped by SIGTERM at step {step}" in out
    assert checkpoint.verify(run / "checkpoints" / checkpoint.tag_for(step)) is None
    # Each rank exits 143 without a traceback; torchrun reports the group's non-zero exits as a failure of its own
    # (ChildFailedError, status 1): the one traceback is torchrun's.
    assert agent.returncode == 1 and err.count("Traceback (most recent call last)") == 1, err[-3000:]
    assert "ChildFailedError" in err.split("Traceback (most recent call last)")[1]
    assert sorted(re.findall(r"exitcode\s+:\s*(-?\d+)", err)) == ["143", "143"], err[-3000:]  # its summary
    assert events(run, "preempted")[-1]["signal"] == "SIGTERM"


@pytest.mark.slow
def test_slurm_preemption_onto_a_corrupted_newest_checkpoint_resumes_from_the_one_before(tmp_path):
    """launch/slurm.sbatch under the stub scheduler (one node, one rank): USR1 -> PREEMPT file -> checkpoint and
    requeue; before the requeued job starts, the checkpoint the preemption wrote is corrupted. The requeued job
    skips it, resumes from the one before and ends with the losses of an uninterrupted run."""
    steps = ["trainer.max_steps=30", "trainer.ckpt_interval=5", "trainer.eval_interval=0", "logging=none",
             "trainer.micro_batch_size=4"]  # fmt: skip
    train(tmp_path / "whole", *steps)
    stub, run = tmp_path / "slurm", tmp_path / "run"
    stub.mkdir()
    (stub / "hold").write_text("")  # the stub holds a requeued job until this file is gone
    environ = {**env(), "SLURM_STUB_DIR": str(stub), "SLURM_STUB_JOB_ID": "78", "RUN_DIR": str(run),
               "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port()),
               "PATH": f"{REPO / 'tests/slurm_stub'}:{REPO / '.venv/bin'}:{os.environ['PATH']}"}  # fmt: skip
    sbatch = subprocess.run(["sbatch", "--nodes", "1", "launch/slurm.sbatch", *TINY, *steps], cwd=REPO,
                            env=environ, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sbatch.stdout.strip() == "Submitted batch job 78", sbatch.stderr
    log = stub / "slurm-78.out"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000010" / checkpoint.MANIFEST).exists():
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.05)
    os.kill(int((stub / "job-78.pid").read_text()), signal.SIGUSR1)
    while not (stub / "job-78.status").exists():
        assert time.time() < deadline + 300, log.read_text()[-3000:]
        time.sleep(0.2)
    preempted = events(run, "preempted")[-1]["step"]
    newest = run / "checkpoints" / checkpoint.tag_for(preempted)
    flip(newest / MODEL)
    (stub / "hold").unlink()
    while len((stub / "job-78.status").read_text().split()) < 2:
        assert time.time() < deadline + 600, log.read_text()[-3000:]
        time.sleep(0.2)
    assert (stub / "job-78.status").read_text().split()[-1] == "0", log.read_text()[-3000:]
    assert (stub / "scontrol.log").read_text() == "requeue 78\n"
    rejected = events(run, "checkpoint_rejected")[-1]
    assert rejected["checkpoint"] == str(newest) and "checksum mismatch" in rejected["reason"]
    assert events(run, "resume")[-1]["step"] == max(s for s in range(5, preempted, 5))
    assert losses(run) == losses(tmp_path / "whole")


def _flips_bench():
    spec = importlib.util.spec_from_file_location("checkpoint_flips", REPO / "bench" / "checkpoint_flips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_random_byte_flips_are_detected_and_the_resume_is_exact(tmp_path):
    """bench/checkpoint_flips.py with 3 flips (the bench runs 50): each one detected, each resume exact."""
    result = _flips_bench().run_trials(tmp_path, flips=3, seed=0)
    assert result["flips"] == 3 and result["detected"] == 3 and result["exact_fallbacks"] == 3, result
