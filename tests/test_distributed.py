"""torchrun with 2 CPU ranks (gloo): ZeRO-2 and ZeRO-3 train and leave the same run directory as one process."""

import pytest

from tests.helpers import train, train_jobs, train_rows, val_rows

pytestmark = pytest.mark.slow

COMMON = ("trainer.max_steps=6", "trainer.eval_interval=3", "trainer.ckpt_interval=3")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(run, *COMMON, "trainer.micro_batch_size=8", subprocess_=True)  # the run directory train.py leaves
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """ZeRO-2 and ZeRO-3 on 2 ranks, in one torchrun launch (tests/dist_jobs.py); 2 ranks × 4 = the same global
    batch of 8 samples, in the same global order."""
    root = tmp_path_factory.mktemp("two_ranks")
    jobs = [(root / f"zero{stage}", [*COMMON, f"engine=zero{stage}", "trainer.micro_batch_size=4"]) for stage in (2, 3)]
    assert set(train_jobs(jobs, nproc=2).values()) == {0}
    return root


def top_level(run):
    # Hydra's own files (.hydra/, train.log: train.py under torchrun writes them, the next test) and what
    # tests/dist_jobs.py adds (each rank's console, the job's exit status) are not the trainer's.
    hydra_or_harness = (".hydra", "train.log", "stdout_rank", "exit_status")
    return sorted(p.name for p in run.iterdir() if not p.name.startswith(hydra_or_harness))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(two_ranks, single, stage):
    run = two_ranks / f"zero{stage}"
    assert top_level(run) == top_level(single)
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert tags == sorted(p.name for p in (single / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE.json").is_file()
    two, one = train_rows(run), train_rows(single)
    assert [r["step"] for r in two] == list(range(1, 7))
    assert set(two[0]) == set(one[0])
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4)
        assert a["tokens"] == b["tokens"]
    assert val_rows(run)[-1]["val_loss"] == pytest.approx(val_rows(single)[-1]["val_loss"], rel=1e-3)
    assert not list(run.glob("rank*")), "only rank 0 writes files"


def test_ranks_agree_on_the_default_run_directory(tmp_path):
    """Without hydra.run.dir, each rank would resolve ${now:} itself; train.py makes them share rank 0's stamp."""
    proc = train(None, "trainer.max_steps=2", "logging=none", nproc=2, cwd=tmp_path)
    (run,) = list((tmp_path / "outputs").iterdir())
    assert f"run directory: {run.relative_to(tmp_path)}" in proc.stdout or f"run directory: {run}" in proc.stdout
    assert len(train_rows(run)) == 2
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    assert not list(run.glob("rank*")), "only rank 0 writes files"
