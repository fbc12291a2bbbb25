"""Spike forensics: what the batch and the model looked like at a spike, and whether the batch or the state
caused it — the experiment PaLM ran by hand, automated.

    <run_dir>/spikes/<step>/batch.json       global sample positions (and sample ids) of the step's batch,
                                             loss per sequence now and on the previous checkpoint's weights
    <run_dir>/spikes/<step>/forensics.json   per-block gradient norms, Adam update norms, forward gains,
                                             MoE routing entropy / MaxVio, the classification and its numbers
    <run_dir>/spikes/<step>/report.md        the same, for people;  spike.png: metrics around the spike

Classification: the firing metric is recomputed for the same batch on the newest earlier checkpoint's weights.
With mu the detector's window mean, the spike is *data* when the old state spikes on the batch too,
(old - mu) >= 1/2 (now - mu), and *state* otherwise. Everything runs on rank 0 on plain fp32 copies of the
model (the engine is not touched); ZeRO-3 and expert-parallel runs, whose ranks hold only shards, get the batch
record and the plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from stabletrain import StableTrainError, checkpoint
from stabletrain.config.frozen import thawed
from stabletrain.models import build_model
from stabletrain.models.moe import maxvio
from stabletrain.monitoring.attribution import markdown, rank_documents
from stabletrain.monitoring.plots import finite, log_scale_if_positive, pyplot
from stabletrain.training.callbacks import CALLBACKS, Callback, SpikeContext


@CALLBACKS.register("forensics")
class Forensics(Callback):
    """On every spike (monitor.forensics), rank 0 writes <run_dir>/spikes/<step>/ from a SpikeContext."""

    main_rank_only = True

    @classmethod
    def build(cls, trainer) -> "Forensics | None":
        return cls(trainer.model.cfg, trainer.data) if trainer.cfg.monitor.forensics else None

    def __init__(self, model_cfg, data):
        self.model_cfg, self.data = thawed(model_cfg), data
        if hasattr(self.model_cfg.residual, "kernel"):
            self.model_cfg.residual.kernel = "eager"  # no compile for a one-off pass
        self.model_kwargs: Callable[[torch.Tensor], dict] = data.model_kwargs

    def on_spike(self, trainer, ctx: SpikeContext) -> dict:
        return _analyse(self, ctx)


def _block_of(name: str) -> str:
    """The report's row for a parameter: `blocks.<i>` for block parameters, else the top-level module."""
    return ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]


def _plain_model(f: Forensics, state: dict):
    model = build_model(f.model_cfg)
    model.load_state_dict(state)
    return model.eval()


def _examine(f: Forensics, model, tokens: torch.Tensor) -> dict:
    """Loss per sequence, gradient norm and per-block gradient norms, gains and routing for one batch."""
    for r in model.routers():
        r.load.zero_()
    block_io: dict[int, float] = {}
    hooks = [
        b.register_forward_hook(
            lambda mod, inp, out, i=i: block_io.__setitem__(
                i,
                (
                    out.detach().float().norm(dim=-1).mean()
                    / inp[0].detach().float().norm(dim=-1).mean().clamp(min=1e-30)
                ).item(),
            )
        )
        for i, b in enumerate(model.blocks)
    ]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs, **f.model_kwargs(tokens))
    for h in hooks:
        h.remove()
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none")
    per_seq = per_token.view(targets.shape).mean(-1)
    per_seq.mean().backward()
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = _block_of(name)
            groups[key] = groups.get(key, 0.0) + p.grad.float().pow(2).sum().item()
    routing = []
    for r in model.routers():
        share = r.load / r.load.sum().clamp(min=1)
        entropy = -(share * share.clamp(min=1e-12).log()).sum().item()
        routing.append({"entropy": entropy, "max_entropy": math.log(len(share)), "maxvio": maxvio(r.load)})
    return {
        "per_token": per_token.view(targets.shape).detach(),  # for the documents' ranking (not written out)
        "loss": per_seq.mean().item(),
        "per_seq_loss": per_seq.tolist(),
        "grad_norm": math.sqrt(sum(groups.values())),
        "grad_norm_by_block": {k: math.sqrt(v) for k, v in groups.items()},
        "gain_by_block": [block_io[i] for i in sorted(block_io)],
        "routing": routing,
    }


def _adam_update_norms(adam_state: dict[str, dict] | None, model) -> dict[str, float] | None:
    """Per-block norm of the update AdamW would take with this batch's gradient (the live optimizer's moments;
    None where they are partitioned, ZeRO-1/2)."""
    if adam_state is None:
        return None
    out: dict[str, float] = {}
    for name, p in model.named_parameters():  # the forensic copy's gradients, the live moments
        st = adam_state.get(name)
        if p.grad is None or st is None:
            continue
        (b1, b2), t, g = st["betas"], st["step"] + 1, p.grad
        m = b1 * st["exp_avg"] + (1 - b1) * g
        v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        upd = st["lr"] * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + st["eps"])
        key = _block_of(name)
        out[key] = math.sqrt(out.get(key, 0.0) ** 2 + upd.pow(2).sum().item())
    return out


def _previous_weights(checkpoints: Path, step: int) -> tuple[Path, dict] | None:
    """The newest intact checkpoint before `step` and its fp32 weights (read with weights-only loading). Verified
    as a resume verifies (digests and the safe-loading scan; rank 0 alone checks every file), and each newer one
    refused is said on stderr with the reason: comparing against silently corrupt weights would misclassify."""
    for tag_dir in checkpoint.tags_newest_first(checkpoints):
        if checkpoint.step_of(tag_dir) >= step:
            continue
        rejection = checkpoint.verify(tag_dir, collective=False)
        if rejection is None:
            try:
                return tag_dir, checkpoint.model_weights(tag_dir)
            except StableTrainError as e:  # a file the safe loader refuses: look further back
                rejection = e
        print(f"stabletrain: forensics: skipping checkpoint {tag_dir.name}: {rejection}", file=sys.stderr)
    return None


def _classify(metric: str, now_value: float, old_value: float | None, mu: float, fires) -> tuple[str, str]:
    """`data` when the same batch on the previous checkpoint's weights would have fired the same detector too
    (the batch spikes from an earlier state as well), `state` when it would not."""
    if old_value is None:
        return "unclassified", "no earlier checkpoint to re-run the batch on"
    if not math.isfinite(now_value):
        cause = "data" if not math.isfinite(old_value) else "state"
        return cause, f"{metric} is {now_value} now and {old_value:.4g} on the previous checkpoint"
    cause = "data" if fires(metric, old_value) else "state"
    return cause, (
        f"{metric}: {now_value:.4g} at the spike, {old_value:.4g} for the same batch on the previous "
        f"checkpoint, window mean {mu:.4g}: the old state {'spikes too' if cause == 'data' else 'does not spike'}"
    )


def _analyse(f: Forensics, ctx: SpikeContext) -> dict:
    result, tokens = ctx.result, ctx.tokens.cpu()
    out = ctx.checkpoints.parent / "spikes" / str(result.step)
    out.mkdir(parents=True, exist_ok=True)
    metric = result.firings[0].metric
    now = old = adam = previous = None
    if ctx.weights is not None:  # ranks holding shards (ZeRO-3, expert parallelism) get the batch record only
        model_now = _plain_model(f, ctx.weights)
        now = _examine(f, model_now, tokens)
        adam = _adam_update_norms(ctx.adam_state, model_now)
        previous = _previous_weights(ctx.checkpoints, result.step)
    if previous is not None:
        old = _examine(f, _plain_model(f, previous[1]), tokens)
    documents = None
    if now is not None and ctx.sample_ids is not None:  # which documents of the batch the spike came from
        sources, docs = f.data.documents(ctx.sample_ids)
        documents = rank_documents(now.pop("per_token"), sources, docs, tokens, f.data.tokenizer.decode)
    if old is not None:
        old.pop("per_token")
    mu = ctx.window_mean(metric)
    observed = result.loss if metric == "loss" else result.grad_norm
    cause, why = _classify(metric, observed, None if old is None else old[metric], mu, ctx.would_fire)
    batch = {
        "step": result.step,
        "batch_index": ctx.batch_index,
        "positions": ctx.positions,
        "sample_ids": ctx.sample_ids,
        "per_seq_loss_now": now and now["per_seq_loss"],
        "per_seq_loss_previous_checkpoint": old and old["per_seq_loss"],
    }
    (out / "batch.json").write_text(json.dumps(batch) + "\n")
    facts = {
        "step": result.step,
        "firings": [{"kind": f.kind, **f.fields()} for f in result.firings],
        "response": result.response,
        "cause": cause,
        "why": why,
        "window_mean": mu,
        "previous_checkpoint": str(previous[0]) if previous else None,
        "weights": "before the update" if not result.applied else "after the update (response log)",
        "documents": documents,
        "now": now,
        "previous": old,
        "adam_update_norm_by_block": adam,
    }
    (out / "forensics.json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
    _plot(ctx.history, result, now, old, out / "spike.png")
    (out / "report.md").write_text(_report(result, facts, batch))
    return {"path": out, "cause": cause}


def _report(result, f: dict, batch: dict) -> str:
    lines = [f"# Spike at step {result.step}: {f['cause']}", "", f"**Cause: {f['cause']}** — {f['why']}.", ""]
    for x in f["firings"]:
        thr = f", threshold {x['threshold']:.4g}" if "threshold" in x else ""
        lines.append(f"- {x['kind']} in `{x['metric']}` ({x['rule']}): {x['value']:.4g}{thr}")
    lines += [
        f"- response: `{result.response}` (update {'applied' if result.applied else 'not applied'})",
        f"- batch: global batch {batch['batch_index']}, stream positions {batch['positions'][0]}.."
        f"{batch['positions'][-1]} (batch.json; replay around it with trainer.skip_batches)",
        f"- previous checkpoint: {f['previous_checkpoint']}",
        "",
    ]
    now, old = f["now"], f["previous"]
    if f.get("documents"):
        lines += ["## Documents of the batch, by their contribution to its loss", "", markdown(f["documents"]), ""]
    if now:
        worst = sorted(range(len(now["per_seq_loss"])), key=lambda i: -now["per_seq_loss"][i])[:5]
        lines += ["| sequence (row) | stream position | loss now | loss on previous checkpoint |", "|---|---|---|---|"]
        for i in worst:
            prev = f"{old['per_seq_loss'][i]:.4f}" if old else "n/a"
            lines.append(f"| {i} | {batch['positions'][i]} | {now['per_seq_loss'][i]:.4f} | {prev} |")
        lines += [
            "",
            "| block | grad norm now | grad norm previous | Adam update norm | forward gain now |",
            "|---|---|---|---|---|",
        ]
        adam = f["adam_update_norm_by_block"] or {}
        for k, g in now["grad_norm_by_block"].items():
            prev = f"{old['grad_norm_by_block'].get(k, float('nan')):.4g}" if old else "n/a"
            gain = ""
            if k.startswith("blocks."):
                gain = f"{now['gain_by_block'][int(k.split('.')[1])]:.4g}"
            lines.append(f"| {k} | {g:.4g} | {prev} | {adam.get(k, float('nan')):.4g} | {gain} |")
        for i, r in enumerate(now["routing"]):
            lines.append(
                f"- MoE layer {i}: routing entropy {r['entropy']:.3f} of {r['max_entropy']:.3f}, "
                f"MaxVio {r['maxvio']:.3f}"
            )
    else:
        lines.append(
            "Per-sequence and per-block analysis needs full weights on one rank (not ZeRO-3 or expert parallel)."
        )
    lines += ["", "![metrics around the spike](spike.png)", ""]
    return "\n".join(lines)


def _plot(history: list[tuple], result, now: dict | None, old: dict | None, path: Path) -> None:
    plt = pyplot()

    hist = list(history)
    fig, axes = plt.subplots(1, 3 if now else 1, figsize=(15 if now else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    steps = [h[0] for h in hist]
    losses, norms = finite(h[1] for h in hist), finite(h[2] for h in hist)
    ax.plot(steps, losses, label="loss", color="C0")
    log_scale_if_positive(ax)
    ax.axvline(result.step, color="red", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, norms, color="C1", label="grad norm")
    log_scale_if_positive(ax2)
    ax2.set_ylabel("grad norm")
    ax.set_title(f"step {result.step}: {result.firings[0].kind} in {result.firings[0].metric}")
    if now:
        ax = axes[0][1]
        x = range(len(now["per_seq_loss"]))
        ax.bar([i - 0.2 for i in x], finite(now["per_seq_loss"]), width=0.4, label="now")
        if old:
            ax.bar([i + 0.2 for i in x], finite(old["per_seq_loss"]), width=0.4, label="previous checkpoint")
        ax.set_xlabel("sequence in batch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax = axes[0][2]
        keys = list(now["grad_norm_by_block"])
        bars = finite(now["grad_norm_by_block"][k] for k in keys)
        ax.bar([i - 0.2 for i in range(len(keys))], bars, width=0.4, label="now")
        if old:
            ax.bar(
                [i + 0.2 for i in range(len(keys))],
                finite(old["grad_norm_by_block"].get(k, 0) for k in keys),
                width=0.4,
                label="previous checkpoint",
            )
        ax.set_xticks(range(len(keys)), keys, rotation=60, fontsize=7)
        log_scale_if_positive(ax)
        ax.set_ylabel("grad norm")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
