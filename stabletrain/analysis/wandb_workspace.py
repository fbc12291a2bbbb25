"""The W&B dashboard to watch a run or a sweep in, built with wandb-workspaces and saved to the project.

    python -m stabletrain.analysis.wandb_workspace ENTITY/PROJECT [--group SWEEP] [--layers L] [--name NAME]

Sections: loss and validation with the spike, skip and rollback events marked; gradient norm, clipping and skipped
steps; signal gains (per layer and the composite Amax gains of HC/mHC); MoE MaxVio and expert loads; FP8
statistics and coverage; throughput, MFU and memory; checkpoint I/O (what a save blocked the step for, its whole
time, its size, the time of a load). Every panel key is one the trainer logs (metrics.jsonl's keys, and
`events/<kind>` markers for events). Set `logging.workspace_url` to the printed URL and spike alerts link to it.
"""

from __future__ import annotations

import argparse

EVENTS = ["events/spike", "events/nonfinite", "events/skip_step", "events/lr_cut", "events/rollback", "events/abort"]


def sections(layers: int, moe_layers: list[int] | None = None) -> dict[str, list[list[str]]]:
    """Section title -> panels, each the metric keys drawn together."""
    moe_layers = moe_layers or []
    return {
        "Loss and validation": [["loss", *EVENTS], ["val_loss"], ["val_ppl"]],
        "Gradient norm and skipped steps": [["grad_norm", *EVENTS], ["update_skipped"], ["lr"]],
        "Signal gains": [
            ["gain/fwd_max"],
            [f"gain/fwd/{i}" for i in range(layers)],
            [f"gain/grad/{i}" for i in range(layers)],
            ["gain/amax_fwd_max", "gain/amax_bwd_max", "gain/amax_fwd_from_input_max"],
        ],
        "MoE balance": [["moe/maxvio_batch"], ["moe/maxvio_global"]] + [[f"moe/load/{i}"] for i in moe_layers],
        "FP8": [
            ["fp8/underflow/attn", "fp8/underflow/mlp", "fp8/underflow/expert"],
            ["fp8/gemm_rel_err/mlp"],
            ["fp8/scale_min", "fp8/scale_max"],
            ["fp8/coverage"],
        ],
        "Throughput and memory": [["tokens_per_s"], ["mfu"], ["step_time_s"], ["mem/peak_gib"]],
        "Checkpoints": [["ckpt/blocking_s", "ckpt/save_s"], ["ckpt/bytes"], ["ckpt/load_s"]],
    }


def panel_keys(layers: int, moe_layers: list[int] | None = None) -> set[str]:
    return {k for panels in sections(layers, moe_layers).values() for keys in panels for k in keys}


def build(
    entity: str,
    project: str,
    layers: int,
    group: str | None = None,
    name: str | None = None,
    moe_layers: list[int] | None = None,
):
    """The workspace object (nothing is sent until .save())."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    built = []
    for title, panels in sections(layers, moe_layers).items():
        plots = [wr.LinePlot(title=keys[0] if len(keys) == 1 else title, x="Step", y=list(keys)) for keys in panels]
        built.append(ws.Section(name=title, panels=plots, is_open=True))
    runsets = ws.RunsetSettings(filters=[ws.Metric("Group") == group]) if group else ws.RunsetSettings()
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"stabletrain {group or project}",
        sections=built,
        runset_settings=runsets,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="ENTITY/PROJECT")
    p.add_argument("--group", help="only the runs of this W&B group (a sweep, a recipe)")
    p.add_argument("--layers", type=int, default=4, help="blocks of the model (per-layer gain panels)")
    p.add_argument("--moe-layers", type=int, nargs="*", default=[], help="MoE block indices (expert-load panels)")
    p.add_argument("--name")
    args = p.parse_args(argv)
    if args.target.count("/") != 1:
        raise SystemExit("stabletrain: error: the target is ENTITY/PROJECT")
    entity, project = args.target.split("/")
    workspace = build(entity, project, args.layers, args.group, args.name, args.moe_layers).save()
    print(f"saved workspace: {workspace.url}  (set logging.workspace_url to it: spike alerts then link here)")


if __name__ == "__main__":
    main()
