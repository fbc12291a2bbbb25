"""The docs check: every command shown in README.md and docs/ runs, or is marked as one that cannot run here.

Commands live in fenced blocks: ```bash (run by this test, shortened, in a scratch directory that holds a small
corpus), ```bash cluster (needs GPUs, a cluster or the network), ```bash long (benchmarks and experiments that take
minutes), ```bash no-run (the suite itself, or a command that rewrites tracked files). Commands of the last three
kinds are not run, but a train.py command among them must compose, a script must exist and a module must import.
Output examples go in ```text blocks. The configuration reference must match the schemas.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from stabletrain.cli import setup
from stabletrain.cli.docs import OUT as CONFIG_REFERENCE
from stabletrain.cli.docs import render
from stabletrain.config import check_overrides
from tests.helpers import PYTHON, REPO, _train_here, env, run_module

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKS = {"": "run", "cluster": "not run", "long": "not run", "no-run": "not run"}
COMMAND_WORDS = ("python", "make", "torchrun", "bash", "sbatch", ".venv/bin/python", "source", "pip")
# Appended to every train.py command that trains (later overrides win): two tiny steps.
SHORT = ["trainer.max_steps=2", "trainer.eval_interval=0", "trainer.eval_batches=1", "trainer.micro_batch_size=2",
         "trainer.ckpt_interval=0", "data.seq_len=32", "logging=none", "logging.progress=false"]  # fmt: skip


def fenced_blocks() -> list[tuple[Path, str, str, list[str]]]:
    """(file, language, mark, lines) of every fenced block."""
    out = []
    for path in DOCS:
        lang = None
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                if lang is None:
                    info = line[3:].split()
                    lang, mark, body = (info[0] if info else ""), " ".join(info[1:]), []
                else:
                    out.append((path, lang, mark, body))
                    lang = None
            elif lang is not None:
                body.append(line)
    return out


def commands(lines: list[str]) -> list[str]:
    """One string per command: continuation lines joined, comment lines dropped."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


BLOCKS = fenced_blocks()
RUN = [(p, c) for p, lang, mark, body in BLOCKS if lang == "bash" and mark == "" for c in commands(body)]
SHOWN = [(p, c) for p, lang, mark, body in BLOCKS if lang == "bash" and mark != "" for c in commands(body)]


def test_every_command_block_is_marked():
    bad = [f"{p.relative_to(REPO)}: ```{lang} {mark}" for p, lang, mark, _ in BLOCKS
           if lang not in ("bash", "text", "python", "yaml") or (lang == "bash" and mark not in MARKS)]  # fmt: skip
    assert bad == [] and len(RUN) >= 20


def test_no_command_outside_a_fenced_block():
    """An indented (unfenced) code block that starts with a command would escape this check."""
    found = []
    for path in DOCS:
        fenced = False
        for line in path.read_text().splitlines():
            fenced ^= line.startswith("```")
            if not fenced and line.startswith("    ") and line.strip().split(" ")[0] in COMMAND_WORDS:
                found.append(f"{path.relative_to(REPO)}: {line.strip()[:80]}")
    assert found == []


def test_configuration_reference_is_current():
    assert CONFIG_REFERENCE.read_text() == render(), "run: python -m stabletrain.cli.docs"


def _split(command: str) -> tuple[dict, list[str]]:
    """(environment assignments, argv) of a command line, its trailing comment dropped."""
    words = shlex.split(command, comments=True)
    assignments = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        assignments[key] = value
    return assignments, words


def _train_args(argv: list[str]) -> list[str] | None:
    """The overrides a command passes to train.py (directly, via torchrun or a launch script), or None."""
    for i, word in enumerate(argv):
        if word.endswith("train.py") or word.startswith("launch/"):
            return [a for a in argv[i + 1 :] if a != "hostfile"]
    return None


@pytest.mark.parametrize("doc, command", SHOWN, ids=[c[:60] for _, c in SHOWN])
def test_commands_that_do_not_run_here_still_match_the_code(doc, command):
    setup()
    _, argv = _split(command)
    args = _train_args(argv)
    if args is not None:
        if "-m" in args:  # a sweep: compose its first point
            args = [a for a in args if "(" not in a]  # sweeper search spaces (interval(...), choice(...))
            args = [a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0] if "=" in a else a for a in args]
            args = [a for a in args if a != "-m" and not a.startswith("hydra.sweep")]
        assert check_overrides(args, REPO / "conf") is None, check_overrides(args, REPO / "conf")
    elif argv[:2] == ["python", "-m"] and argv[2] != "pytest":
        assert importlib.util.find_spec(argv[2]) is not None, argv[2]
    for word in argv:
        if word.startswith(("bench/", "launch/")) and word.endswith((".py", ".sh", ".sbatch")):
            assert (REPO / word).is_file(), word


def make_sandbox(root: Path) -> Path:
    """A scratch working directory with the files the docs' examples name: corpus/, books/, held_out/, train.py."""
    plays = [json.loads(line) for line in (REPO / "data/shakespeare/train.jsonl").read_text().splitlines()]
    for d in ("corpus", "books", "held_out"):
        (root / d).mkdir()
    for name, part in (("a", plays[:3]), ("b", plays[3:6])):
        rows = [json.dumps({"text": p["text"], "content": p["text"]}) for p in part]
        (root / "corpus" / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    for i, play in enumerate(plays[12:16]):
        (root / "books" / f"{i}.txt").write_text(play["text"])
    (root / "held_out" / "a.txt").write_text(plays[16]["text"])
    (root / "train.py").symlink_to(REPO / "train.py")
    return root


def _run(command: str, root: Path, n: int) -> subprocess.CompletedProcess:
    assignments, argv = _split(command)
    environ = {**env(), **assignments, "PYTHONPATH": str(REPO)}
    args = _train_args(argv)
    if args is not None:
        run_dir = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir=run{n}"]
        short = [] if "trainer.plan=true" in args else SHORT
        sweep_dir = "-m" in args and not any(a.startswith("hydra.sweep.dir=") for a in args)
        args = [*args, *short, *run_dir] + ([f"hydra.sweep.dir=sweep{n}"] if sweep_dir else [])
    if argv[0] == "source":
        return subprocess.CompletedProcess(argv, 0, "", "")  # the venv is this interpreter's already
    if argv[0] == "make":
        make_args = argv[2:] if len(argv) > 2 else []
        extra = " ".join([*(a.split("=", 1)[1] for a in make_args if a.startswith("ARGS=")), *SHORT,
                          f"hydra.run.dir={root / f'run{n}'}"])  # fmt: skip
        cmd = ["make", "-C", str(REPO), argv[1], f"ARGS={extra}"]
        return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)
    if argv[:2] == ["python", "train.py"] and "-m" not in args:
        old = {k: os.environ.get(k) for k in assignments}
        os.environ.update(assignments)
        cwd = Path.cwd()
        try:
            os.chdir(root)
            return _train_here(Path(next(a.split("=", 1)[1] for a in reversed(args) if a.startswith("hydra.run.dir="))),
                               [a for a in args if not a.startswith("hydra.run.dir=")])  # fmt: skip
        finally:
            os.chdir(cwd)
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if argv[:2] == ["python", "-m"] and argv[2].startswith("stabletrain.") and not assignments:
        return run_module(argv[2], argv[3:], root)
    argv = [PYTHON if w == "python" else w for w in argv]
    if argv[0] == "torchrun":  # the launcher of this interpreter, on a free port
        argv = [PYTHON, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    if args is not None:
        argv = argv[: argv.index(next(w for w in argv if w.endswith("train.py"))) + 1] + args
    cwd = REPO if argv[1:3] == ["-m", "pytest"] else root
    return subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


# A block repeated verbatim elsewhere (the planner's example in three documents) runs once.
RUN_BLOCKS = [(p, i, commands(body)) for i, (p, lang, mark, body) in enumerate(BLOCKS) if lang == "bash" and mark == ""]
RUN_BLOCKS = [b for n, b in enumerate(RUN_BLOCKS) if b[2] not in [earlier[2] for earlier in RUN_BLOCKS[:n]]]


@pytest.mark.slow
@pytest.mark.parametrize("doc, index, block", RUN_BLOCKS, ids=[f"{d.relative_to(REPO)}:{i}" for d, i, _ in RUN_BLOCKS])
def test_every_runnable_command_in_the_docs_runs(doc, index, block, tmp_path):
    """Each fenced block's commands in order (a command may use what an earlier one of its block wrote: a
    checkpoint, a prepared directory), in a scratch directory of its own."""
    root = make_sandbox(tmp_path)
    failures = []
    for n, command in enumerate(block):
        proc = _run(command, root, n)
        if proc.returncode != 0:
            failures.append(f"{command}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    assert failures == [], "\n\n".join(failures)
