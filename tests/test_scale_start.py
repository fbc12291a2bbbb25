"""Starting at the scale a run is for: the model built on the meta device, each rank materializing only what it
owns, the pre-flight fit check, compile by default on CUDA only, and a start-up that prints every phase."""

import json
import subprocess
import time

import pytest
import torch

from stabletrain.parallel.compile import compile_enabled
from stabletrain.planner.preflight import Capacity, preflight
from stabletrain.planner.search import GiB
from tests.helpers import PYTHON, REPO, composed, env, train

# Runs a command as the only child of a fresh interpreter, so that its peak RSS is that command's alone.
MEASURE = (
    "import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr, "
    "'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)


def _measured(cmd: list[str], timeout: int) -> dict:
    proc = subprocess.run([PYTHON, "-c", MEASURE, *cmd], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_a_27b_model_on_this_machine_stops_in_one_line_within_a_minute(tmp_path):
    t0 = time.perf_counter()
    r = _measured([PYTHON, "train.py", "model=mhc_27b", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    elapsed = time.perf_counter() - t0
    errors = [line for line in r["err"].splitlines() if line.startswith("stabletrain: error")]
    assert r["rc"] == 2 and elapsed < 60 and "Traceback" not in r["err"] + r["out"], r
    assert len(errors) == 1 and "does not fit" in errors[0], r["err"][-2000:]
    line = errors[0]
    assert "GiB per rank" in line and "model=mhc_27b" in line and "torchrun" in line, line
    assert r["rss_kib"] / 1024**2 <= 3.0, r["rss_kib"]


@pytest.mark.slow
def test_one_rank_of_27b_under_a_large_layout_materializes_what_the_planner_counts():
    """pp=16 x ep=8 x dp=8 (128 ranks): the fullest stage's rank, built alone in one process without a process
    group. Its count equals the planner's for that rank (within 1%), its memory stays near those bytes."""
    args = ["model=mhc_27b", "engine=zero1", "engine.pipeline_stages=16", "engine.expert_parallel=8"]
    proc = subprocess.run([PYTHON, "-m", "tests.scale_rank", *args, "--data-parallel", "8"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(r["materialized"] - r["planned"]) <= 0.01 * r["planned"], r
    assert r["materialized"] < r["total"] / 20, r
    assert r["peak_rss_gib"] <= 1.5 * r["bytes"] / GiB + 1.0, r


def test_preflight_answers_with_the_fastest_layout_that_fits_this_world_size(monkeypatch):
    cfg = composed("model=baseline_1b", "precision=bf16", "engine=zero0")
    monkeypatch.setattr("stabletrain.planner.preflight.capacity", lambda device, local: Capacity(12 * GiB, "test"))
    fit = preflight(cfg, 8, 8, torch.device("cpu"))
    assert fit.fits is False and fit.need > 0.9 * 12 * GiB
    assert "fastest layout that fits 8 rank(s): torchrun --nnodes 1 --nproc_per_node 8 train.py" in fit.message
    assert "model=baseline_1b needs" in fit.message and "has 12.0 GiB" in fit.message
    monkeypatch.setattr("stabletrain.planner.preflight.capacity", lambda device, local: Capacity(400 * GiB, "test"))
    assert preflight(cfg, 8, 8, torch.device("cpu")).fits


def test_compile_defaults_to_auto_which_compiles_on_cuda_only():
    assert composed().trainer.compile == "auto"
    assert not compile_enabled("auto", torch.device("cpu")) and compile_enabled("auto", torch.device("cuda", 0))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda", 0))


def test_start_up_prints_every_phase_and_preflight_can_be_relaxed(tmp_path):
    proc = train(tmp_path / "run", "trainer.max_steps=1", "trainer.eval_interval=0", "logging=none")
    phases = [line.split(":")[1].strip() for line in proc.stdout.splitlines() if line.startswith("stabletrain: ")]
    assert phases == ["config", "preflight", "data", "meta build", "parallelize", "materialize", "engine", "first step"]
    assert "rank 0 materialized" in proc.stdout and "GiB" in proc.stdout
    big = train(tmp_path / "big", "trainer.max_steps=1", "data.seq_len=32768", "trainer.micro_batch_size=512",
                "model.d_model=64", "logging=none", check=False, tiny=False)  # fmt: skip
    assert big.returncode == 2 and "does not fit" in big.stderr and "activations" in big.stderr
