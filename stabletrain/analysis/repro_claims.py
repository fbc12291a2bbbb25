"""One function per claim of the reproduction report: the runs of its recipe in, a `Section` out (summary rows,
a detail table, plots). Every number comes from the run directories: metrics.jsonl, events.jsonl and the final
checkpoint (held-out losses, per-block variance, layer pruning). The tests behind each verdict are in
stabletrain.analysis.repro_stats; each paper number is quoted with the table or figure it comes from."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from stabletrain.analysis import repro_plots as plots
from stabletrain.analysis.report import count_events, markdown_table
from stabletrain.analysis.repro_runs import Run
from stabletrain.analysis.repro_stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    Verdict,
    above_zero,
    all_of,
    fmt,
    growth_test,
    lower_test,
)
from stabletrain.analysis.significance import difference

NORMS = ("pre-norm", "LNS")


@dataclass(frozen=True)
class Comparison:
    """A loss comparison made on both texts (claim 7): its verdict on each and the run sets it compares."""

    name: str
    val: str
    held: str
    runs: tuple[str, ...]


@dataclass
class Section:
    title: str
    rows: list[list[str]]  # summary rows: claim, paper, ours, verdict
    detail: str = ""  # markdown under the section's heading
    figures: list[str] = field(default_factory=list)
    heldout: list[Comparison] = field(default_factory=list)
    recipe: str = ""  # how the runs were made, read from their configs


def recipe_line(runs: list[Run]) -> str:
    """The runs' recipe and settings, from their saved configs."""
    groups = sorted({r.group for r in runs})
    cfg = runs[0].cfg
    m, t, o = dict(cfg["model"]), cfg["trainer"], cfg["optim"]
    for key in ("d_model", "n_layers"):  # a sweep over sizes: every value
        m[key] = "/".join(str(v) for v in sorted({r.cfg["model"][key] for r in runs}))
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in runs}))
    commands = " and ".join(f"`python train.py -m experiment={g}`" for g in groups)
    shape = f"{t['max_steps']} steps of {t['micro_batch_size']} x {cfg['data']['seq_len']} tokens"
    return (
        f"Runs: {commands} ({len(runs)} runs): d_model {m['d_model']}, {m['n_layers']} blocks, {shape}, "
        f"lr {o['lr']:g}, seeds {seeds}.\n"
    )


def split(runs: list[Run], key, order: tuple = ()) -> dict:
    """label -> runs sorted by seed; labels in `order`, then the others in first-seen order."""
    out: dict = {}
    for run in sorted(runs, key=lambda r: r.seed):
        out.setdefault(key(run), []).append(run)
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def norm_label(run: Run) -> str:
    norm = run.cfg["model"]["norm"]
    return "LNS" if norm.get("kind", norm.get("depth_scaling")) == "lns" else "pre-norm"  # older runs: depth_scaling


def both(val: str, held: str) -> str:
    return val if val == held else f"{val} (held-out: {held})"


def losses(groups: dict[str, list[Run]]) -> tuple[dict, dict]:
    """(validation, held-out) final losses per group, one per seed."""
    return (
        {k: [r.final_val for r in rs] for k, rs in groups.items()},
        {k: [r.heldout_loss for r in rs] for k, rs in groups.items()},
    )


def _gain_stats(rs: list[Run]) -> dict:
    g = [[row for row in r.rows if "gain/amax_fwd_max" in row] for r in rs]
    return {
        "peak_fwd": [max(x["gain/amax_fwd_max"] for x in gi) for gi in g],
        "peak_bwd": [max(x["gain/amax_bwd_max"] for x in gi) for gi in g],
        "final_fwd": [gi[-1]["gain/amax_fwd_max"] for gi in g],
        "final_bwd": [gi[-1]["gain/amax_bwd_max"] for gi in g],
    }


def _gain_tests(log_peak: dict) -> tuple[dict, dict, Verdict | None]:
    """Per depth, mHC's log10 peak minus HC's (Welch); per stream, the slope of log10 peak on blocks; HC's slope
    minus mHC's."""
    depths = sorted({L for _, L in log_peak})
    per_depth = {
        L: lower_test(log_peak[("mhc", L)], log_peak[("hc", L)])
        for L in depths
        if ("mhc", L) in log_peak and ("hc", L) in log_peak
    }
    slopes = {}
    for kind in ("hc", "mhc"):
        xs = [L for L in depths if (kind, L) in log_peak for _ in log_peak[(kind, L)]]
        if len(set(xs)) > 1:
            slopes[kind] = growth_test(xs, [v for L in sorted(set(xs)) for v in log_peak[(kind, L)]])
    gap = None
    if len(slopes) == 2:
        gap = above_zero(difference(slopes["hc"].interval, slopes["mhc"].interval), "t")
    return per_depth, slopes, gap


def gains(runs: list[Run], figdir: Path) -> Section:
    """Claim 1: the peak composite Amax gain over training per stream and depth; its growth with depth."""
    groups = split(runs, lambda r: (r.cfg["model"]["residual"]["kind"], r.cfg["model"]["n_layers"]))
    stat = {key: _gain_stats(rs) for key, rs in groups.items()}
    peak = {key: [max(f, b) for f, b in zip(s["peak_fwd"], s["peak_bwd"])] for key, s in stat.items()}
    log_peak = {key: [math.log10(v) for v in vs] for key, vs in peak.items()}  # gains compound: a log scale
    per_depth, slopes, gap = _gain_tests(log_peak)
    parts = [v.verdict for v in per_depth.values()] + [slopes["hc"].verdict if "hc" in slopes else INCONCLUSIVE]
    verdict = all_of(parts + [gap.verdict if gap else INCONCLUSIVE])
    spread = lambda key, d: f"{statistics.fmean(peak[key]):.{d}f} ({min(peak[key]):.{d}f}–{max(peak[key]):.{d}f})"  # noqa: E731
    depths = sorted({L for _, L in peak})
    ours = "; ".join(
        f"{L} blocks: "
        + ", ".join(
            f"{name} {spread((k, L), d)}" for k, name, d in (("hc", "HC", 1), ("mhc", "mHC", 3)) if (k, L) in peak
        )
        for L in depths
    )
    ours = f"peak over training (max of fwd, bwd), mean (seed range): {ours}. Slope of log10 peak per block: "
    ours += "; ".join(f"{name} {slopes[k]}" for k, name in (("hc", "HC"), ("mhc", "mHC")) if k in slopes)
    ours += f"; HC − mHC {gap}" if gap else ""
    if per_depth:
        least = max(per_depth.items(), key=lambda kv: (kv[1].verdict == NOT_REPRODUCED, kv[1].interval.hi))
        ours += f". mHC − HC in log10 peak at the least clear depth ({least[0]} blocks): {least[1]}"
    detail = [
        [
            k,
            str(L),
            *(fmt(stat[(k, L)][m], 3) for m in ("peak_fwd", "peak_bwd", "final_fwd", "final_bwd")),
            str(len(groups[(k, L)])),
        ]
        for k, L in sorted(stat)
    ]
    table = markdown_table(
        ["stream", "blocks", "peak Amax fwd", "peak Amax bwd", "final Amax fwd", "final Amax bwd", "seeds"], detail
    )
    table += "\nmHC − HC in log10 of the peak gain, per depth (Welch):\n\n"
    table += markdown_table(
        ["blocks", "mHC − HC (95% CI, p)", "verdict"], [[str(L), str(v), v.verdict] for L, v in per_depth.items()]
    )
    plots.gains(groups, figdir / "gains.png")
    claim = "1. mHC keeps the composite Amax gain from growing with depth; HC's grows"
    paper = "27B, 60 sublayers: HC's peaks near 3000 (Fig. 3b), mHC's at about 1.6 (Fig. 7b)"
    return Section(
        "1. Composite signal gain: HC vs mHC over depth", [[claim, paper, ours, verdict]], table, ["gains.png"]
    )


def _loss_table(groups: dict[str, list[Run]], extra=None) -> str:
    rows = []
    for label, rs in groups.items():
        row = [label, fmt([r.final_val for r in rs]), fmt([r.heldout_loss for r in rs])]
        rows.append(row + (extra(rs) if extra else []) + [str(len(rs))])
    head = ["model", "validation loss", "held-out loss (KJV)"] + (["spikes per run"] if extra else []) + ["seeds"]
    return markdown_table(head, rows)


def residual(runs: list[Run], figdir: Path) -> Section:
    """Claim 2: final validation and held-out loss of mHC against the baseline (2a) and HC (2b)."""
    names = {"standard": "baseline", "hc": "HC", "mhc": "mHC"}
    kind = lambda r: r.cfg["model"]["residual"]["kind"]  # noqa: E731
    groups = split(runs, lambda r: names.get(kind(r), kind(r)), ("baseline", "HC", "mHC"))
    if not {"baseline", "HC", "mHC"} <= set(groups):
        return Section("2. Loss at equal tokens: baseline vs HC vs mHC", [])
    val, held = losses(groups)
    spikes = {k: [count_events(r.events, "spike") for r in rs] for k, rs in groups.items()}
    rows, compared = [], []
    papers = {
        "baseline": "27B: final loss 0.021 below the baseline (Fig. 5a); 3B, 9B, 27B: below the baseline at "
        "every compute budget, the gap narrowing slightly (Fig. 6a)",
        "HC": "27B only: HC's loss surges near step 12k where mHC's does not (Fig. 2a, 5a); the text gives no "
        "final HC–mHC number",
    }
    for tag, other in (("2a", "baseline"), ("2b", "HC")):
        v, h = lower_test(val["mHC"], val[other]), lower_test(held["mHC"], held[other])
        ours = (
            f"validation loss {other} {fmt(val[other])}, mHC {fmt(val['mHC'])}; mHC − {other} {v}; held-out "
            f"mHC − {other} {h}"
        )
        if other == "HC":
            ours += "; spikes per run: " + ", ".join(f"{k} {sum(s) / len(s):.1f}" for k, s in spikes.items())
        rows.append(
            [
                f"{tag}. At equal tokens mHC reaches a lower loss than {'the ' * (other == 'baseline')}{other}",
                papers[other],
                ours,
                both(v.verdict, h.verdict),
            ]
        )
        runs_compared = ("pre-norm" if other == "baseline" else other, "mHC")
        compared.append(Comparison(f"{tag}. mHC below {other}", v.verdict, h.verdict, runs_compared))
    plots.loss_curves(groups, figdir / "residual_loss.png", "validation loss: baseline vs HC vs mHC")
    return Section(
        "2. Loss at equal tokens: baseline vs HC vs mHC",
        rows,
        _loss_table(groups, lambda rs: [" ".join(str(count_events(r.events, "spike")) for r in rs)]),
        ["residual_loss.png"],
        compared,
    )


def growth(rs: list[Run]) -> list[float]:
    """log10 of the variance after the last block over that after the first, per run."""
    return [math.log10(r.depth["variance"][-1] / r.depth["variance"][0]) for r in rs]


def deep_cost(rs: list[Run]) -> list[float]:
    """Per run, the mean validation-loss increase when one block of the deeper half is removed."""
    return [statistics.fmean(inc[len(inc) // 2 :]) for inc in (r.depth["prune_increase"] for r in rs)]


def lns(prenorm: list[Run], lns_runs: list[Run], figdir: Path) -> Section:
    """Claim 3: per-block variance (a), the cost of removing deep blocks (b), the loss (c), pre-norm vs LNS."""
    groups = {"pre-norm": sorted(prenorm, key=lambda r: r.seed), "LNS": sorted(lns_runs, key=lambda r: r.seed)}
    ratio = {k: [10**g for g in growth(rs)] for k, rs in groups.items()}
    v_growth = lower_test(growth(groups["LNS"]), growth(groups["pre-norm"]))
    deep = {k: deep_cost(rs) for k, rs in groups.items()}
    v_deep = lower_test(deep["pre-norm"], deep["LNS"])
    val, held = losses(groups)
    v_val, v_held = lower_test(val["LNS"], val["pre-norm"]), lower_test(held["LNS"], held["pre-norm"])
    m0, m1 = statistics.fmean(val["pre-norm"]), statistics.fmean(val["LNS"])
    rows = [
        [
            "3a. Pre-norm's output variance grows with depth; LNS slows that growth",
            "grows with depth under pre-norm (Sun et al., Fig. 2); LNS reduces the growth (it does not bound it)",
            f"last/first block "
            f"variance: pre-norm {fmt(ratio['pre-norm'], 1)}, LNS {fmt(ratio['LNS'], 1)}; LNS − pre-norm in log10 of "
            f"the ratio {v_growth}",
            v_growth.verdict,
        ],
        [
            "3b. Removing a deep block costs an LNS model more than a pre-norm one",
            "removing a deep layer costs an LNS model more than a pre-norm one (Sun et al., Fig. 4)",
            f"mean validation-loss increase when one block "
            f"of the deeper half is removed: pre-norm {fmt(deep['pre-norm'], 3)}, LNS {fmt(deep['LNS'], 3)}; "
            f"pre-norm − LNS {v_deep}",
            v_deep.verdict,
        ],
        [
            "3c. LNS lowers the loss at equal tokens",
            "130M: perplexity 26.73 -> 25.76 (-3.6%) (Sun et al.)",
            f"validation loss pre-norm {fmt(val['pre-norm'])} (ppl {math.exp(m0):.1f}), LNS {fmt(val['LNS'])} (ppl "
            f"{math.exp(m1):.1f}); LNS − pre-norm {v_val}; held-out {v_held}",
            both(v_val.verdict, v_held.verdict),
        ],
    ]
    plots.depth_profile(groups, figdir / "lns_depth.png")
    compared = Comparison("3c. LNS below pre-norm", v_val.verdict, v_held.verdict, ("pre-norm", "LNS"))
    return Section("3. Curse of Depth: LayerNorm Scaling", rows, _loss_table(groups), ["lns_depth.png"], [compared])


def bslo(prenorm: list[Run], lns_runs: list[Run], bslo_runs: list[Run], figdir: Path) -> Section:
    """Claim 6: BSLO's propagation scalar vs LNS vs pre-norm: variance over depth and loss."""
    groups = {
        "pre-norm": sorted(prenorm, key=lambda r: r.seed),
        "LNS": sorted(lns_runs, key=lambda r: r.seed),
        "BSLO": sorted(bslo_runs, key=lambda r: r.seed),
    }
    ratio = {k: [10**g for g in growth(rs)] for k, rs in groups.items()}
    v_growth = lower_test(growth(groups["BSLO"]), growth(groups["pre-norm"]))
    val, held = losses(groups)
    v_val, v_held = lower_test(val["BSLO"], val["pre-norm"]), lower_test(held["BSLO"], held["pre-norm"])
    ours = (
        f"last/first block variance: pre-norm {fmt(ratio['pre-norm'], 1)}, LNS {fmt(ratio['LNS'], 1)}, BSLO "
        f"{fmt(ratio['BSLO'], 1)}; BSLO − pre-norm in log10 of the ratio {v_growth}; validation loss BSLO − "
        f"pre-norm {v_val}"
    )
    plots.depth_profile(groups, figdir / "bslo_depth.png")
    row = [
        "6. BSLO's propagation scalar keeps the stream's norm even over depth (our reading of an article)",
        "no paper; no number given",
        ours,
        v_growth.verdict,
    ]
    compared = Comparison("6. BSLO below pre-norm", v_val.verdict, v_held.verdict, ("pre-norm", "BSLO"))
    return Section(
        "6. BSLO (our reading of an article, not a paper's claim)",
        [row],
        _loss_table(groups),
        ["bslo_depth.png"],
        [compared],
    )


def heldout_summary(sections: list[Section]) -> list[list[str]]:
    """Claim 7: does each loss comparison reach the same verdict on held-out text as on validation text? Comparisons
    that share a set of runs are not independent: the row names them."""
    pairs = [c for s in sections for c in s.heldout]
    if not pairs:
        return []
    agree = [c.name for c in pairs if c.val == c.held]
    differ = [f"{c.name} ({c.val} on validation, {c.held} held-out)" for c in pairs if c.val != c.held]
    ours = f"{len(agree)} of {len(pairs)} loss comparisons reach the same verdict on held-out text"
    ours += (": differ " + "; ".join(differ)) if differ else ""
    users: dict[str, list[str]] = {}
    for c in pairs:
        for label in c.runs:
            users.setdefault(label, []).append(c.name.split(".")[0])
    shared = [f"{', '.join(names)} use the same {label} runs" for label, names in users.items() if len(names) > 1]
    if shared:  # a chance high or low mean of a shared set moves every comparison that uses it together
        ours += f". Not independent: {'; '.join(shared)}"
    verdict = "consistent" if not differ else "differs"
    return [["7. The loss comparisons hold on text the models never saw (KJV, 7 books)", "—", ours, verdict]]
