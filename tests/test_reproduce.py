"""The reproduction suite: the report's arithmetic on hand-built inputs with known answers, every repro_* recipe
composing its whole sweep and running a few steps, and the report built from real run directories."""

from __future__ import annotations

import itertools
import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from stabletrain.analysis import repro_stats as st
from stabletrain.analysis.report import count_events
from stabletrain.analysis.repro_runs import HELDOUT, find_runs
from stabletrain.analysis.reproduce import main as reproduce_main
from stabletrain.cli import setup
from stabletrain.models import build_model
from tests.helpers import REPO, composed, train, val_rows

RECIPES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("repro_*.yaml"))


def test_seed_statistics_and_verdicts():
    assert st.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert st.mean_sd([5.0]) == (5.0, 0.0)
    assert st.lower_verdict([1.0, 1.2], [2.0, 2.2]) == st.REPRODUCED
    assert st.lower_verdict([2.0, 2.2], [1.0, 1.2]) == st.NOT_REPRODUCED
    assert st.lower_verdict([1.0, 2.0], [1.4, 1.6]) == st.INCONCLUSIVE  # the spreads overlap
    assert st.lowest_verdict([1.0, 1.0], [[2.0, 2.0], [3.0, 3.0]]) == st.REPRODUCED
    assert st.lowest_verdict([1.0, 1.0], [[2.0, 2.0], [0.5, 0.5]]) == st.NOT_REPRODUCED
    gaps = st.paired_relative_gap({0: 2.0, 1: 4.0, 2: 1.0}, {0: 2.002, 1: 3.996, 7: 9.0})  # seeds 0 and 1 pair
    assert gaps == pytest.approx([0.001, -0.001])
    assert st.within_verdict(gaps, 0.0025) == st.REPRODUCED  # |0| + 0.0014 < 0.0025
    assert st.within_verdict([0.01, 0.012], 0.0025) == st.NOT_REPRODUCED
    assert st.within_verdict([0.0, 0.005], 0.0025) == st.INCONCLUSIVE


def test_maxvio_of_the_whole_set_is_not_the_mean_of_the_batches():
    assert st.maxvio([1, 1, 1, 1]) == 0.0
    assert st.maxvio([4, 0, 0, 0]) == 3.0
    batches = [[2, 0], [0, 2]]  # each batch fully on one expert (MaxVio 1), the set perfectly even
    assert [st.maxvio(b) for b in batches] == [1.0, 1.0]
    assert st.maxvio_global(batches) == 0.0
    rows = [{"step": i, "moe/maxvio_batch": float(i)} for i in range(10)] + [{"step": 10, "val_loss": 1.0}]
    assert st.tail_mean(rows, "moe/maxvio_batch", 4) == 7.5
    rows = [{"step": 1, "moe/load/1": [3, 1], "moe/load/2": [2, 2]},
            {"step": 2, "moe/load/1": [1, 3], "moe/load/2": [4, 0]}, {"step": 3, "val_loss": 1.0}]  # fmt: skip
    # layer 1: summed [4, 4] -> 0; layer 2: summed [6, 2] -> 0.5; the mean over layers 0.25; the last step alone 0.75
    assert st.maxvio_over_steps(rows, 2) == pytest.approx(0.25)
    assert st.maxvio_over_steps(rows, 1) == pytest.approx((0.5 + 1.0) / 2)
    assert count_events([{"kind": "spike"}, {"kind": "skip_step"}, {"kind": "spike"}], "spike") == 2


class _AddBlock(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, *args):
        return x + self.c


def test_layer_pruning_measures_each_block_alone():
    blocks = nn.ModuleList(_AddBlock(c) for c in (1.0, 2.0, 5.0))

    def loss() -> float:  # a "loss" that falls by c when block c runs: removing it costs exactly c
        x = torch.zeros(1)
        for b in blocks:
            x = b(x)
        return float(-x.sum())

    assert st.prune_increase(blocks, loss) == pytest.approx([1.0, 2.0, 5.0])
    assert loss() == -8.0  # every block restored


class _Double(nn.Module):
    def forward(self, x, *args):
        return 2 * x


def test_per_block_variance_follows_the_stream():
    torch.manual_seed(0)
    cfg = composed("model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.vocab_size=100")
    model = build_model(cfg.model).eval()
    model.blocks = nn.ModuleList(_Double() for _ in model.blocks)  # each block doubles the stream: variance x4
    var = st.block_output_variance(model, torch.randint(0, 100, (2, 16)))
    assert [var[i + 1] / var[i] for i in range(2)] == pytest.approx([4.0, 4.0], rel=1e-5)
    assert model.probe is None


def _sweep(recipe: str) -> tuple[dict, list[list[str]]]:
    """The recipe's hydra.sweeper.params and every job's overrides, as `train.py -m experiment=<recipe>` expands."""
    setup()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={recipe}"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    sweep = OmegaConf.to_container(cfg.hydra.sweep)  # unresolved: the subdir names the seed of each job
    assert sweep["dir"].startswith("multirun/repro/") and "${trainer.seed}" in sweep["subdir"]
    return params, [[f"{k}={v}" for k, v in zip(params, combo)] for combo in itertools.product(*params.values())]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_repro_recipe_composes_every_job_and_runs(tmp_path, recipe):
    params, jobs = _sweep(recipe)
    assert params["trainer.seed"] == ["0", "1", "2"]
    for job in jobs:
        cfg = composed(f"experiment={recipe}", *job)
        assert cfg.logging.group == recipe and not cfg.logging.wandb
    train(tmp_path / "run", f"experiment={recipe}", *jobs[-1], "trainer.max_steps=2", "trainer.eval_batches=1",
          "logging=none", tiny=False)  # fmt: skip
    assert val_rows(tmp_path / "run")[-1]["step"] == 2


VARIANTS = [("repro_lns", "model/norm=none", "none"), ("repro_lns", "model/norm=lns", "lns"),
            ("repro_bslo", "model/norm=none", "bslo"), ("repro_fp8", "precision=bf16", "bf16"),
            ("repro_fp8", "precision=fp8", "fp8")]  # fmt: skip


@pytest.mark.slow
def test_the_report_is_built_from_the_runs(tmp_path, capsys):
    """Claims 3, 5 and 6 from two seeds of 3 steps each; the numbers in the report are those of the runs."""
    runs = tmp_path / "repro"
    short = ["trainer.max_steps=3", "trainer.eval_batches=1", "trainer.eval_interval=3", "logging=none"]
    for seed in (0, 1):
        for recipe, variant, name in VARIANTS:
            train(runs / f"{name}_s{seed}", f"experiment={recipe}", variant, f"trainer.seed={seed}", *short, tiny=False)
    reproduce_main([str(runs), "--out", str(tmp_path / "docs")])
    report = (tmp_path / "docs" / "reproduction.md").read_text()
    assert len(find_runs([runs])) == 10 and "(10 runs;" in report
    for claim in ("3a.", "3b.", "3c.", "5.", "6.", "7."):
        assert f"| {claim}" in report
    assert re.search(r"\| 1\. .*\| not run \|", report) and re.search(r"\| 4\. .*\| not run \|", report)
    pre_norm = [val_rows(runs / f"none_s{s}")[-1]["val_loss"] for s in (0, 1)]
    assert f"pre-norm {st.fmt(pre_norm)}" in report
    bf16, fp8 = ([val_rows(runs / f"{p}_s{s}")[-1]["val_loss"] for s in (0, 1)] for p in ("bf16", "fp8"))
    assert "/".join(f"{100 * (f - b) / b:+.2f}%" for b, f in zip(bf16, fp8)) in report
    for png in ("lns_depth.png", "fp8_loss.png", "bslo_depth.png"):
        assert (tmp_path / "docs" / "reproduction" / png).stat().st_size > 10_000
        assert f"(reproduction/{png})" in report
    # A run whose tokenizer is not where its config says (made in another checkout): an error, never a new one.
    moved = tmp_path / "moved" / "fp8_s0"
    shutil.copytree(runs / "fp8_s0", moved)
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace("vocab_size: 4096", "vocab_size: 4095", 1))
    with pytest.raises(SystemExit):
        reproduce_main([str(runs), str(moved.parent), "--out", str(tmp_path / "docs2")])
    assert "its tokenizer" in capsys.readouterr().err
    assert not list((REPO / "data" / "shakespeare" / "tokenizer").glob("sp4095-*"))


def test_report_without_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce_main([str(tmp_path), "--out", str(tmp_path / "docs")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("stabletrain: error: no run directories under")


def test_heldout_corpus_is_real_text_apart_from_the_training_corpus():
    text = HELDOUT.read_text()
    assert len(text) > 200_000 and "In the beginning" not in text and "Naomi" in text
    assert "Bethlehemjudah" in text and "Bethlehemjudah" not in (REPO / "data/shakespeare/train.jsonl").read_text()
