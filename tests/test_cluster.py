"""Cluster behaviour on one machine: two torchrun agents on loopback form one job; torchrun's elastic agent restarts a
group whose rank was killed and the run continues from its newest checkpoint; a preemption checkpoints and
resumes exactly."""

import os
import signal
import subprocess
import time

import pytest

from stabletrain.distributed import free_port
from tests.helpers import PYTHON, REPO, TINY, env, read_jsonl, train, train_rows, val_rows

pytestmark = pytest.mark.slow

COMMON = ["trainer.eval_interval=0", "logging=none", "trainer.micro_batch_size=4"]
MOE_SMALL = ["model/ffn=moe", "model.ffn.n_routed=4", "model.ffn.expert_hidden=32", "model.ffn.top_k=2"]


def _torchrun(*launcher: str, run_dir, overrides) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "torch.distributed.run", *launcher, str(REPO / "train.py"), *TINY, *COMMON, *overrides,
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}  # the last row of each step


STEPS = ["trainer.max_steps=30", "trainer.ckpt_interval=5", "trainer.keep_checkpoints=20"]  # a kill after step 10


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted 2-rank run the interrupted ones must reproduce."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(run, *COMMON, *STEPS, nproc=2)
    return run


def test_two_agents_on_loopback_form_one_job(tmp_path, whole):
    """Two agents of one rank each, joined by the c10d rendezvous: the same numbers as one agent of two ranks."""
    port = free_port()
    agents = [
        _torchrun(
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",  # the launch a cluster uses; each agent's node rank comes from the rendezvous
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=loopback",
            run_dir=tmp_path / "two_agents",
            overrides=STEPS,
        )  # fmt: skip
        for _ in (0, 1)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    assert _losses(tmp_path / "two_agents") == _losses(whole)


def _workers(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_is_restarted_and_the_run_continues_exactly(tmp_path, whole):
    steps = STEPS
    run = tmp_path / "elastic"
    agent = _torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", run_dir=run,
                      overrides=[*steps, "trainer.resume=auto"])  # fmt: skip
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000010" / "COMPLETE.json").exists():
        assert time.time() < deadline and agent.poll() is None, "the run ended before the kill"
        time.sleep(0.05)
    workers = _workers(agent.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, err[-3000:]
    events = read_jsonl(run / "events.jsonl")
    restarts = [e for e in events if e["kind"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["count"] == 1 and restarts[0]["resumed_from"] >= 10
    assert _losses(run) == _losses(whole)


def test_a_sweep_launches_torchrun_jobs_and_summarizes_them(tmp_path):
    from stabletrain.analysis import sweep as sweep_summary

    sweep = tmp_path / "sweep"
    cmd = [PYTHON, str(REPO / "train.py"), "-m", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", *TINY,
           *COMMON, "trainer.max_steps=4", "trainer.eval_interval=2", "optim.lr=-1,1e-3",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "0" / "exit_status").read_text() != "0"  # lr=-1: a config error, and the sweep went on
    assert (sweep / "1" / "exit_status").read_text() == "0"
    assert (sweep / "1" / "checkpoints" / "latest").is_file() and (sweep / "1" / "config.yaml").is_file()
    assert val_rows(sweep / "1")[-1]["val_loss"] > 0
    assert {r["rank"] for r in read_jsonl(sweep / "1" / "events.jsonl") if "rank" in r} <= {0}
    sweep_summary.main([str(sweep)])
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[:3] == ["1", "optim.lr=0.001", "ok"]  # best first, failures last
    assert "failed" in rows[2] and "optim.lr=-1.0 must be > 0" in rows[2] and (sweep / "val_loss.png").is_file()


def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(tmp_path, whole):
    """launch/slurm.sbatch under stub sbatch/srun/scontrol (tests/slurm_stub): 2 nodes of 1 rank on this machine."""
    steps = STEPS
    stub, run = tmp_path / "slurm", tmp_path / "run"
    environ = {**env(), "SLURM_STUB_DIR": str(stub), "SLURM_STUB_JOB_ID": "77", "RUN_DIR": str(run),
               "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port()),
               "PATH": f"{REPO / 'tests/slurm_stub'}:{REPO / '.venv/bin'}:{os.environ['PATH']}"}  # fmt: skip
    sbatch = subprocess.run(["sbatch", "--nodes", "2", "launch/slurm.sbatch", *TINY, *COMMON, *steps], cwd=REPO,
                            env=environ, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sbatch.stdout.strip() == "Submitted batch job 77", sbatch.stderr
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000010" / "COMPLETE.json").exists():
        assert time.time() < deadline, (stub / "slurm-77.out").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(int((stub / "job-77.pid").read_text()), signal.SIGUSR1)  # SLURM's --signal=B:USR1@<seconds>
    while not (stub / "job-77.status").exists() or len((stub / "job-77.status").read_text().split()) < 2:
        assert time.time() < deadline + 300, (stub / "slurm-77.out").read_text()[-3000:]
        time.sleep(0.2)
    assert (stub / "job-77.status").read_text().split()[-1] == "0", (stub / "slurm-77.out").read_text()[-3000:]
    assert (stub / "scontrol.log").read_text() == "requeue 77\n"
    kinds = [e["kind"] for e in read_jsonl(run / "events.jsonl")]
    assert kinds.count("preempted") == 1 and kinds.count("resume") == 2
    assert _losses(run) == _losses(whole)


def _sweep(tmp_path, *args):
    cmd = [PYTHON, str(REPO / "train.py"), "-m", *TINY, *COMMON, "trainer.max_steps=3", "trainer.eval_interval=3",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "sweep"


def test_submitit_local_launcher_gives_each_job_its_run_directory(tmp_path):
    sweep = _sweep(tmp_path, "hydra/launcher=submitit_local", "optim.lr=1e-3,3e-3")
    for job in ("0", "1"):
        assert (sweep / job / "config.yaml").is_file() and (sweep / job / "checkpoints" / "latest").is_file()
        assert val_rows(sweep / job)[-1]["val_loss"] > 0


def test_optuna_sweeper_minimizes_the_validation_loss(tmp_path):
    sweep = _sweep(tmp_path, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=minimize",
                   "hydra.sweeper.sampler.seed=0", "optim.lr=interval(1e-3,3e-3)")  # fmt: skip
    best = (sweep / "optimization_results.yaml").read_text()
    losses = [val_rows(sweep / j)[-1]["val_loss"] for j in ("0", "1")]
    assert f"best_value: {min(losses)}" in best


def test_the_wandb_workspace_shows_keys_the_trainer_logs(tmp_path):
    from stabletrain.analysis import wandb_workspace

    run = tmp_path / "run"
    train(run, "model=mhc", *MOE_SMALL, "precision=fp8", "trainer.max_steps=3", "trainer.eval_interval=3",
          "monitor.gain_interval=1", "logging=none")  # fmt: skip
    logged = {k for r in read_jsonl(run / "metrics.jsonl") for k in r}
    keys = wandb_workspace.panel_keys(layers=2, moe_layers=[1])
    conditional = {"update_skipped", "ckpt/load_s"}  # a vetoed step, a resume only (their own tests)
    assert {k for k in keys if not k.startswith("events/")} - conditional <= logged
    workspace = wandb_workspace.build("team", "stabletrain", layers=2, group="sweep1", moe_layers=[1])
    shown = {y for section in workspace.sections for panel in section.panels for y in panel.y}
    assert shown == keys and [s.name for s in workspace.sections][0] == "Loss and validation"


def test_the_deepspeed_launcher_runs_with_a_hostfile_of_localhost_slots(tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    environ = {**env(), "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    cmd = ["bash", "launch/deepspeed_launcher.sh", str(tmp_path / "hostfile"), *TINY, *COMMON, "trainer.max_steps=4",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and [r["step"] for r in train_rows(tmp_path / "run")] == [1, 2, 3, 4]
