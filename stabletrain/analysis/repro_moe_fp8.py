"""Claims 4 (auxiliary-loss-free balancing and its update rate u) and 5 (FP8 against bf16) of the reproduction
report: the runs of their recipes in, a `Section` out, as stabletrain.analysis.repro_claims does for the others."""

from __future__ import annotations

from pathlib import Path

from stabletrain.analysis import repro_plots as plots
from stabletrain.analysis.report import markdown_table
from stabletrain.analysis.repro_claims import Comparison, Section, both, losses, split
from stabletrain.analysis.repro_runs import Run
from stabletrain.analysis.repro_stats import (
    NOT_REPRODUCED,
    REPRODUCED,
    Verdict,
    band_reading,
    fmt,
    lower_test,
    maxvio_over_steps,
    paired_relative_gap,
    tail_mean,
    tail_sd,
    within_test,
)

FP8_BOUND = 0.0025  # DeepSeek-V3: relative loss error of FP8 training below 0.25%
MAXVIO_TAIL = 50  # training steps averaged for MaxVio per batch
WANG = "Wang et al. (arXiv 2408.15664)"


def _router(run: Run) -> str:
    return run.cfg["model"]["ffn"]["router"]["kind"]


def _global(rs: list[Run]) -> list[float]:
    return [r.vals[-1]["moe/maxvio_global"] for r in rs]


def moe(runs: list[Run], u_runs: list[Run], figdir: Path) -> Section:
    """Claim 4: MaxVio (batch, global) and loss per router; 4b, 4c: the bias update rate u of aux_free."""
    groups = split(runs, _router, ("none", "softmax_aux", "aux_free", "bslo"))
    if not {"softmax_aux", "aux_free"} <= set(groups):
        return Section("4. Auxiliary-loss-free load balancing", [])
    glob = {k: _global(rs) for k, rs in groups.items()}
    batch = {k: [tail_mean(r.rows, "moe/maxvio_batch", MAXVIO_TAIL) for r in rs] for k, rs in groups.items()}
    steps = {k: [maxvio_over_steps(r.rows, MAXVIO_TAIL) for r in rs] for k, rs in groups.items()}
    val, held = losses(groups)
    v_vio = lower_test(glob["aux_free"], glob["softmax_aux"])
    v_cost = lower_test(val["softmax_aux"], val["aux_free"])  # "at an equal or better loss" fails if this holds
    verdict = NOT_REPRODUCED if NOT_REPRODUCED == v_vio.verdict or v_cost.verdict == REPRODUCED else v_vio.verdict
    alpha = groups["softmax_aux"][0].cfg["model"]["ffn"]["router"]["aux_loss_coef"]
    label = {k: f"softmax_aux (α = {alpha:g})" if k == "softmax_aux" else k for k in groups}
    u_groups = split(u_runs, lambda r: float(r.cfg["model"]["ffn"]["router"]["bias_update_rate"]))
    u_groups.setdefault(
        float(groups["aux_free"][0].cfg["model"]["ffn"]["router"]["bias_update_rate"]), groups["aux_free"]
    )
    u_groups = dict(sorted(u_groups.items()))
    ours = (
        f"MaxVio global: aux_free {fmt(glob['aux_free'], 3)}, softmax_aux (α = {alpha:g}) "
        f"{fmt(glob['softmax_aux'], 3)}, aux_free − softmax_aux {v_vio}; validation loss aux_free − softmax_aux "
        f"{lower_test(val['aux_free'], val['softmax_aux'])}"
    )
    plots.moe(groups, u_groups, figdir / "moe_balance.png")
    rows = [
        [label[k], fmt(batch[k], 3), fmt(steps[k], 3), fmt(glob[k], 3), fmt(val[k]), fmt(held[k]), str(len(groups[k]))]
        for k in groups
    ]
    detail = _moe_detail(rows, u_groups)
    claim = "4. Aux-loss-free balancing: lower global MaxVio at an equal or better loss"
    paper = f"{WANG}, 1B against an auxiliary loss of α = 0.001: MaxVio global 0.04 vs 0.72, perplexity 9.50 vs 9.56"
    v_loss = lower_test(val["aux_free"], val["softmax_aux"]), lower_test(held["aux_free"], held["softmax_aux"])
    return Section(
        "4. Auxiliary-loss-free load balancing",
        [[claim, paper, ours, verdict], *u_sensitivity(u_groups)],
        detail,
        ["moe_balance.png"],
        [
            Comparison(
                "4. aux_free loss vs softmax_aux", v_loss[0].verdict, v_loss[1].verdict, ("softmax_aux", "aux_free")
            )
        ],
    )


def _moe_detail(rows: list[list[str]], u_groups: dict[float, list[Run]]) -> str:
    """The per-router table, then the table over the bias update rate u."""
    detail = markdown_table(
        [
            "router",
            f"MaxVio per batch (mean of last {MAXVIO_TAIL} steps)",
            f"MaxVio of the last {MAXVIO_TAIL} batches together",
            "MaxVio global (validation)",
            "validation loss",
            "held-out loss (KJV)",
            "seeds",
        ],
        rows,
    )
    u_rows = [
        [
            f"{u:g}",
            fmt(_global(rs), 3),
            fmt([tail_sd(r.rows, "moe/maxvio_batch", MAXVIO_TAIL) for r in rs], 3),
            fmt([r.final_val for r in rs]),
            str(len(rs)),
        ]
        for u, rs in u_groups.items()
    ]
    detail += "\nBias update rate u of aux_free:\n\n"
    return detail + markdown_table(
        ["u", "MaxVio global", f"sd of MaxVio per batch over the last {MAXVIO_TAIL} steps", "validation loss", "seeds"],
        u_rows,
    )


def u_sensitivity(u_groups: dict[float, list[Run]]) -> list[list[str]]:
    """Claims 4b, 4c (Wang et al.'s update-rate ablation): u = 1e-4 balances more slowly than the chosen 1e-3; u =
    1e-2 makes the load oscillate more. Each row also says how 1e-2 compares on MaxVio and loss."""
    rows = []
    vio = {u: _global(rs) for u, rs in u_groups.items()}
    loss = {u: [r.final_val for r in rs] for u, rs in u_groups.items()}
    osc = {u: [tail_sd(r.rows, "moe/maxvio_batch", MAXVIO_TAIL) for r in rs] for u, rs in u_groups.items()}
    if {1e-4, 1e-3} <= set(u_groups):
        v = lower_test(vio[1e-3], vio[1e-4])
        ours = (
            f"MaxVio global: u = 1e-4 {fmt(vio[1e-4], 3)}, 1e-3 {fmt(vio[1e-3], 3)}; 1e-3 − 1e-4 {v}; "
            f"validation loss 1e-3 − 1e-4 {lower_test(loss[1e-3], loss[1e-4])}"
        )
        rows.append(
            [
                "4b. The bias update rate: u = 1e-4 balances more slowly than u = 1e-3",
                f"{WANG}, 1B ablation of u: 1e-4 balances slowly; 1e-3 chosen",
                ours,
                v.verdict,
            ]
        )
    if {1e-2, 1e-3} <= set(u_groups):
        v = lower_test(osc[1e-3], osc[1e-2])
        ours = (
            f"sd of MaxVio per batch over the last {MAXVIO_TAIL} steps: u = 1e-2 {fmt(osc[1e-2], 3)}, 1e-3 "
            f"{fmt(osc[1e-3], 3)}; 1e-3 − 1e-2 {v}. At u = 1e-2 against 1e-3: MaxVio global "
            f"{fmt(vio[1e-2], 3)} vs {fmt(vio[1e-3], 3)}, 1e-2 − 1e-3 {lower_test(vio[1e-2], vio[1e-3])}; "
            f"validation loss 1e-2 − 1e-3 {lower_test(loss[1e-2], loss[1e-3])}"
        )
        rows.append(
            [
                "4c. The bias update rate: u = 1e-2 makes the load oscillate more than u = 1e-3",
                f"{WANG}, 1B ablation of u: 1e-2 oscillates; 1e-3 chosen",
                ours,
                v.verdict,
            ]
        )
    return rows


def _pct(v: Verdict) -> str:
    i = v.interval
    return f"mean {100 * i.estimate:+.2f}% (95% CI {100 * i.lo:+.2f}% … {100 * i.hi:+.2f}%)"


def fp8(runs: list[Run], figdir: Path) -> Section:
    """Claim 5: the paired relative loss gap of fp8 to bf16, per seed, on validation and held-out text (both scored
    in the run's own precision, the FP8 GEMMs included)."""
    groups = split(runs, lambda r: r.cfg["precision"]["name"], ("bf16", "fp8"))
    if not {"bf16", "fp8"} <= set(groups):
        return Section("5. FP8 vs bf16", [])
    gap = {
        name: paired_relative_gap({r.seed: f(r) for r in groups["bf16"]}, {r.seed: f(r) for r in groups["fp8"]})
        for name, f in (("val", lambda r: r.final_val), ("held", lambda r: r.heldout_loss))
    }
    v_val, v_held = within_test(gap["val"], FP8_BOUND), within_test(gap["held"], FP8_BOUND)
    pct = {k: "/".join(f"{100 * g:+.2f}%" for g in gs) for k, gs in gap.items()}
    ours = (
        f"relative gap (fp8 - bf16) / bf16 per seed: validation {pct['val']}, {_pct(v_val)}: "
        f"{band_reading(v_val, FP8_BOUND)}; held-out (scored with the FP8 GEMMs, as validation) {pct['held']}, "
        f"{_pct(v_held)}: {band_reading(v_held, FP8_BOUND)}"
    )
    plots.loss_curves(groups, figdir / "fp8_loss.png", "validation loss: bf16 vs fp8 (emulated)")
    row = [
        "5. Fine-grained FP8 training stays within 0.25% of bf16's loss",
        "DeepSeek-V3 (arXiv 2412.19437), 16B and 230B MoEs: relative loss error below 0.25%",
        ours,
        both(v_val.verdict, v_held.verdict),
    ]
    rows = [
        [name, fmt([r.final_val for r in rs]), fmt([r.heldout_loss for r in rs]), str(len(rs))]
        for name, rs in groups.items()
    ]
    compared = Comparison("5. fp8 within 0.25% of bf16", v_val.verdict, v_held.verdict, ("bf16", "fp8"))
    table = markdown_table(["model", "validation loss", "held-out loss (KJV)", "seeds"], rows)
    return Section("5. FP8 vs bf16", [row], table, ["fp8_loss.png"], [compared])
