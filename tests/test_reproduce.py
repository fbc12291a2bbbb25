"""The reproduction suite: the report's arithmetic on hand-built inputs with known answers, every repro_* recipe
composing its whole sweep and running a few steps, and the report built from real run directories."""

from __future__ import annotations

import itertools
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from stabletrain.analysis import repro_claims as claims
from stabletrain.analysis import repro_runs
from stabletrain.analysis import repro_stats as st
from stabletrain.analysis import significance as sg
from stabletrain.analysis.report import count_events
from stabletrain.analysis.repro_runs import HELDOUT, Run, find_runs
from stabletrain.analysis.reproduce import main as reproduce_main
from stabletrain.cli import setup
from stabletrain.models import build_model
from tests.helpers import REPO, composed, train, val_rows

RECIPES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("repro_*.yaml"))


def test_the_t_distribution_and_welchs_test_on_hand_computed_cases():
    # Student's t quantiles from the tables: df 1, 4, 10 and the normal limit.
    for df, q in ((1, 12.7062047), (4, 2.7764451), (10, 2.2281389), (1e9, 1.9599640)):
        assert sg.t_ppf(0.975, df) == pytest.approx(q, abs=1e-6)
        assert sg.t_sf(q, df) == pytest.approx(0.025, abs=1e-7)
    # a = 1..5, b = 2, 4, .., 10: means 3 and 6, variances 2.5 and 10; se^2 = 2.5/5 + 10/5 = 2.5; t = -3/sqrt(2.5);
    # Welch-Satterthwaite df = 2.5^2 / (0.5^2/4 + 2^2/4) = 5.88235; two-sided p 0.1075; inconclusive.
    w = sg.welch([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert (w.estimate, w.se, w.df) == pytest.approx((-3.0, math.sqrt(2.5), 6.25 / 1.0625))
    assert w.p == pytest.approx(0.107531, abs=1e-6)
    half = sg.t_ppf(0.975, w.df) * math.sqrt(2.5)  # 2.4585 x 1.5811
    assert (w.lo, w.hi) == pytest.approx((-3 - half, -3 + half)) and half == pytest.approx(3.887742, abs=1e-6)
    assert st.lower_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]).verdict == st.INCONCLUSIVE
    # 1.0/1.1/0.9 against 2.0/2.1/1.9: se^2 = 2 x 0.01/3, df = 4, t = -1/0.08165 = -12.247: reproduced.
    w = sg.welch([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert (w.df, w.estimate / w.se) == pytest.approx((4.0, -12.247449))
    assert (w.lo, w.hi) == pytest.approx((-1 - 2.7764451 * w.se, -1 + 2.7764451 * w.se)) and w.p < 1e-3
    assert st.lower_test([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]).verdict == st.REPRODUCED
    assert st.lower_test([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]).verdict == st.NOT_REPRODUCED
    assert st.lower_test([1.0], [2.0, 2.1]).verdict == st.INCONCLUSIVE  # one seed: no spread, nothing to tell apart


def test_slopes_bounds_and_claims_of_several_parts():
    # y = 2, 4, 5, 4, 5 on x = 1..5: slope 6/10; residuals -0.8, 0.6, 1, -0.6, -0.2, SSE 2.4, se sqrt(0.8/10).
    s = sg.ols_slope([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert (s.estimate, s.se, s.df) == pytest.approx((0.6, math.sqrt(0.08), 3))
    assert (s.lo, s.hi) == pytest.approx((0.6 - 3.1824463 * s.se, 0.6 + 3.1824463 * s.se))
    assert st.growth_test([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]).verdict == st.INCONCLUSIVE
    assert st.growth_test([12, 12, 24, 24, 48, 48], [1.1, 1.3, 1.6, 1.7, 2.3, 2.6]).verdict == st.REPRODUCED
    d = sg.difference(s, s)
    assert d.estimate == 0 and d.se == pytest.approx(math.sqrt(2) * s.se) and d.df == pytest.approx(6)
    # A bound: the t interval of the mean gap, inside / outside / across the +-0.25% band.
    gaps = st.paired_relative_gap({0: 2.0, 1: 4.0, 2: 1.0}, {0: 2.002, 1: 3.996, 7: 9.0})  # seeds 0 and 1 pair
    assert gaps == pytest.approx([0.001, -0.001])
    v = st.within_test(gaps, 0.0025)  # mean 0, se 0.001, df 1: +-0.0127, wider than the band on both sides
    assert v.verdict == st.INCONCLUSIVE and (v.interval.lo, v.interval.hi) == pytest.approx((-0.0127062, 0.0127062))
    assert "lower and upper edge" in st.band_reading(v, 0.0025)
    assert st.within_test([0.001, 0.0012, 0.0008, 0.0011, 0.0009], 0.0025).verdict == st.REPRODUCED
    assert st.within_test([0.01, 0.012, 0.011], 0.0025).verdict == st.NOT_REPRODUCED
    v = st.Verdict(sg.Interval(-0.0006, -0.0031, 0.0019, 0.5, 4, 0.0009), st.INCONCLUSIVE, "t")
    assert st.band_reading(v, 0.0025).startswith("crosses the band's lower edge")  # the -0.31% .. +0.19% case
    assert st.all_of([st.REPRODUCED, st.REPRODUCED]) == st.REPRODUCED
    assert st.all_of([st.REPRODUCED, st.INCONCLUSIVE]) == st.INCONCLUSIVE
    assert st.all_of([st.REPRODUCED, st.NOT_REPRODUCED, st.INCONCLUSIVE]) == st.NOT_REPRODUCED
    assert st.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and st.mean_sd([5.0]) == (5.0, 0.0)


def _gain_run(kind: str, blocks: int, seed: int, peak: float) -> Run:
    cfg = {"model": {"residual": {"kind": kind}, "n_layers": blocks, "d_model": 64}, "trainer": {"seed": seed}}
    run = Run(Path("unused"), cfg)
    run.__dict__["rows"] = [{"step": s, "gain/amax_fwd_max": g, "gain/amax_bwd_max": g}
                            for s, g in ((1, 1.0), (10, peak), (20, peak * 0.9))]  # fmt: skip
    return run


def test_claim_1_fits_the_growth_of_the_gain_with_depth(tmp_path):
    """HC's peak gain x10 per 12 blocks, mHC's flat: mHC below HC at every depth, HC's log-gain slope above 0 and
    above mHC's: reproduced; with HC as flat as mHC, the trend part fails."""
    runs = [_gain_run("hc", L, s, 10 ** (L / 12) * (1 + 0.1 * s)) for L in (12, 24, 48) for s in range(3)]
    runs += [_gain_run("mhc", L, s, 1.001 + 0.0005 * s) for L in (12, 24, 48) for s in range(3)]
    row = claims.gains(runs, tmp_path).rows[0]
    assert row[3] == st.REPRODUCED and "Slope of log10 peak per block: HC +0.0833" in row[2]
    flat = [_gain_run("hc", L, s, 5.0 * (1 + 0.1 * s)) for L in (12, 24, 48) for s in range(3)]
    row = claims.gains(flat + runs[9:], tmp_path).rows[0]
    assert row[3] == st.INCONCLUSIVE  # HC far above mHC, but its gain does not grow with depth


def test_claim_7_names_the_comparisons_that_share_runs():
    sections = [claims.Section("s", [], heldout=[
        claims.Comparison("2a. mHC below baseline", st.REPRODUCED, st.REPRODUCED, ("pre-norm", "mHC")),
        claims.Comparison("3c. LNS below pre-norm", st.INCONCLUSIVE, st.REPRODUCED, ("pre-norm", "LNS")),
        claims.Comparison("5. fp8", st.REPRODUCED, st.REPRODUCED, ("bf16", "fp8"))])]  # fmt: skip
    row = claims.heldout_summary(sections)[0]
    assert row[2].startswith("2 of 3 loss comparisons") and "2a, 3c use the same pre-norm runs" in row[2]
    assert row[3] == "differs"


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
    assert params["trainer.seed"] == ["0", "1", "2", "3", "4"]
    for job in jobs:
        cfg = composed(f"experiment={recipe}", *job)
        assert cfg.logging.group == recipe and cfg.logging.mode == "disabled"
    if recipe in {r for r, _, _ in VARIANTS}:
        return  # test_the_report_is_built_from_the_runs trains this recipe
    train(tmp_path / "run", f"experiment={recipe}", *jobs[-1], "trainer.max_steps=2", "trainer.eval_batches=1",
          "logging=none", tiny=False)  # fmt: skip
    assert val_rows(tmp_path / "run")[-1]["step"] == 2


VARIANTS = [("repro_residual", "model=baseline", "baseline"), ("repro_lns", "model/norm=lns", "lns"),
            ("repro_bslo", "model/norm=none", "bslo"), ("repro_fp8", "precision=bf16", "bf16"),
            ("repro_fp8", "precision=fp8", "fp8")]  # fmt: skip


@pytest.mark.slow
def test_the_report_is_built_from_the_runs(tmp_path, capsys, monkeypatch):
    """Claims 3, 5 and 6 from two seeds of 3 steps each (the pre-norm side of 3 and 6 is repro_residual's
    baseline); the numbers in the report are those of the runs."""
    monkeypatch.setattr(repro_runs, "EVAL_BATCHES", 4)  # held-out loss on 4 batches, pruning on 1: 3-step models
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
    for claim in ("1", "2", "4"):  # repro_residual without HC and mHC runs: claim 2 is not run
        assert re.search(rf"\| {claim}\. .*\| not run \|", report), claim
    pre_norm = [val_rows(runs / f"baseline_s{s}")[-1]["val_loss"] for s in (0, 1)]
    assert f"pre-norm {st.fmt(pre_norm)}" in report and "3c, 6 use the same pre-norm runs" in report
    assert "Welch p = " in report and "95% CI" in report
    bf16, fp8 = ([val_rows(runs / f"{p}_s{s}")[-1]["val_loss"] for s in (0, 1)] for p in ("bf16", "fp8"))
    assert "/".join(f"{100 * (f - b) / b:+.2f}%" for b, f in zip(bf16, fp8)) in report
    for png in ("lns_depth.png", "fp8_loss.png", "bslo_depth.png"):
        assert (tmp_path / "docs" / "reproduction" / png).stat().st_size > 10_000
        assert f"(reproduction/{png})" in report
    # A run whose tokenizer is not where its config says (made in another checkout): an error, never a new one.
    moved = tmp_path / "moved" / "fp8_s0"
    shutil.copytree(runs / "fp8_s0", moved)
    shutil.copytree(runs / "bf16_s0", moved.parent / "bf16_s0")  # claim 5's other side
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace("vocab_size: 4096", "vocab_size: 4095", 1))
    with pytest.raises(SystemExit):
        reproduce_main([str(moved.parent), "--out", str(tmp_path / "docs2")])  # with its pair only
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
