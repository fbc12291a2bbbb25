"""The layout planner: layouts that fit mhc_27b on 64 and 128 GPUs, printed as commands that compose and validate
for that many ranks; its memory model against what a CPU run measures; expert parallelism's share of the experts."""

import contextlib
import io
import re
import shlex

import pytest

from stabletrain.config import validate
from stabletrain.planner.report import configured_layout, print_plan
from stabletrain.planner.search import GiB, ModelProfile, estimate
from tests.helpers import composed, train, train_rows

PAPER_27B = ["experiment=mhc_paper_27b", "precision=bf16", "engine=zero1"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [64, 128])
def test_mhc_27b_gets_layouts_without_zero3_that_compose_and_validate(world):
    overrides = [*PAPER_27B, "trainer.plan=true", f"trainer.plan_world_size={world}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        p = print_plan(composed(*overrides), overrides=overrides)
    text = out.getvalue()
    assert p["memory_gib"]["total"] > 80, "plain ZeRO-1 data parallelism must not fit (the reason for this planner)"
    layouts = [line for line in text.splitlines() if line.startswith("layout:")]
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("torchrun")]
    assert layouts and len(layouts) == len(commands), text
    assert any("zero=3" not in line for line in layouts)
    for line in layouts:
        assert float(re.search(r"mem_per_gpu_gib=([\d.]+)", line).group(1)) <= 0.9 * 80
    for command in commands:
        nodes, per_node = (int(x) for x in re.search(r"--nnodes (\d+) --nproc_per_node (\d+)", command).groups())
        assert nodes * per_node == world
        args = shlex.split(command.split(" train.py ", 1)[1])
        cfg = composed(*args)
        validate(cfg, world=world)
        assert cfg.model.name == "mhc_27b" and cfg.trainer.global_batch_size == 1280


# A model whose activations dwarf the process's other memory at one CPU step (about 0.45 GiB between the modes).
AC_RUN = ["model=mhc", "model.d_model=256", "model.n_layers=8", "model.n_heads=4", "data.seq_len=256",
          "trainer.micro_batch_size=8", "trainer.max_steps=1", "trainer.eval_interval=0", "trainer.eval_batches=1",
          "logging=none"]  # fmt: skip


@pytest.mark.slow
def test_activation_checkpointing_saves_the_memory_the_planner_predicts(tmp_path, monkeypatch):
    # A fixed glibc mmap threshold returns freed blocks to the OS, so the peak RSS follows the live tensors.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    peak, predicted = {}, {}
    for mode in ("none", "block"):
        overrides = [*AC_RUN, f"engine.activation_checkpointing={mode}"]
        train(tmp_path / mode, *overrides, tiny=False, subprocess_=True)
        peak[mode] = train_rows(tmp_path / mode)[0]["mem/peak_gib"]
        cfg = composed(*overrides)
        predicted[mode] = estimate(ModelProfile(cfg), configured_layout(cfg), 1, 8).memory["activations"] / GiB
    saving, expected = peak["none"] - peak["block"], predicted["none"] - predicted["block"]
    assert expected > 0.4
    assert saving == pytest.approx(expected, rel=0.25), (peak, predicted)


def test_expert_parallel_ranks_hold_their_share_of_the_experts():
    def memory(ep):
        cfg = composed("model=moe", f"engine.expert_parallel={ep}", "trainer.plan_world_size=4")
        return estimate(ModelProfile(cfg), configured_layout(cfg), 4, 4 * cfg.trainer.micro_batch_size).memory

    one, four = memory(1), memory(4)
    m = composed("model=moe").model
    routed = (m.n_layers - m.ffn.first_dense) * m.ffn.n_routed * 3 * m.d_model * m.ffn.expert_hidden
    assert one["experts"] == 0 and four["experts"] == pytest.approx(routed / 4 * (4 + 4 + 8))  # fp32 w, grad, Adam
    assert one["weights"] - four["weights"] == pytest.approx(routed * 4)


def test_pipeline_stages_split_the_weights():
    def weights(stages):
        cfg = composed("model.n_layers=8", f"engine.pipeline_stages={stages}", "engine=zero1")
        return estimate(ModelProfile(cfg), configured_layout(cfg), stages, cfg.trainer.micro_batch_size).memory

    one, four = weights(1), weights(4)
    assert four["weights"] < one["weights"] / 2 and four["pipeline"] > 0 == one["pipeline"]
