"""Engine layouts on CPU ranks (gloo): pipeline stages, expert parallelism on ZeRO-1/2 and in bf16, both together,
the global batch, and resuming. Each rank count is one torchrun launch that trains every job in order
(tests/dist_jobs.py); the single-rank, unpipelined references train in this process. Every run sees the same
global batch of 8 sequences (micro-batches of 4), so the per-step numbers must agree."""

import re
from pathlib import Path

import pytest
import torch

from stabletrain.models import Transformer
from tests.helpers import TINY, composed, tensor_paths, train, train_jobs, train_rows, val_rows

pytestmark = pytest.mark.slow

COMMON = ["trainer.max_steps=4", "trainer.eval_interval=0", "logging=none", "trainer.micro_batch_size=4",
          "trainer.global_batch_size=8"]  # fmt: skip
MOE = ["model=moe", "model.ffn.n_routed=4", "model.ffn.expert_hidden=32", "model.ffn.top_k=2"]
PIPE = ["engine.pipeline_stages=2"]
BF16 = ["engine=zero1", "precision=bf16"]
MODELS = {"baseline": [], "mhc": ["model=mhc"], "moe": MOE, "tied": ["model.tie_embeddings=true"]}
STOP = ["trainer.ckpt_interval=2", "trainer.stop_at=2"]  # an interruption after step 2, then resume=auto
RESUME = ["trainer.ckpt_interval=2", "trainer.resume=auto"]
VETO = ["trainer.max_steps=14", "trainer.ckpt_interval=1", "trainer.keep_checkpoints=3", "monitor.warmup_steps=10",
        "monitor.inject.step=14", "monitor.inject.scale=30", "monitor.response=skip_step"]  # fmt: skip
EP_CASES = [(stage, dtype) for stage in ("zero1", "zero2") for dtype in ("fp32", "bf16")]
# Initial weights of mHC + an aux-free MoE on every layout, against the single-process build.
MHC_MOE = [*MOE, "model/residual=mhc"]
INIT = {"pp2": [*PIPE, "engine=zero1"], "zero3": ["engine=zero3"], "ep2": ["engine=zero1", "engine.expert_parallel=2"]}
INIT4 = {"pp2_ep2": [*PIPE, "engine=zero1", "engine.expert_parallel=2"],
         "zero3_4": ["engine=zero3", "trainer.micro_batch_size=2"]}  # fmt: skip


def _ep(stage: str, dtype: str, ep: int) -> list[str]:
    return [*COMMON, *MOE, f"engine={stage}", f"precision={dtype}", f"engine.expert_parallel={ep}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    two = [(root / f"pipe/{m}", [*COMMON, *o, *PIPE]) for m, o in MODELS.items()]
    two += [(root / "pipe/bf16", [*COMMON, *BF16, *PIPE])]
    resumed = {"pipe_resume": ["model=mhc", *PIPE], "pipe_bf16_resume": [*BF16, *PIPE]}
    resumed["ep_resume"] = _ep("zero1", "fp32", 2)
    for name, extra in resumed.items():
        two += [(root / name, [*COMMON, *extra, *STOP]), (root / name, [*COMMON, *extra, *RESUME])]
    two += [(root / "pipe_veto", [*COMMON, *PIPE, *VETO])]
    two += [(root / f"ep{ep}/{s}/{d}", _ep(s, d, ep)) for s, d in EP_CASES for ep in (1, 2)]
    two += [(root / "dp/whole", COMMON), (root / "dp/split", [*COMMON, *STOP])]
    init2 = [(root / f"init/{name}", [*COMMON, *MHC_MOE, *o]) for name, o in INIT.items()]
    status = train_jobs(two + init2, nproc=2, dump_init=tuple(d for d, _ in init2))
    four = [(root / f"pipe2x2/{m}", [*COMMON, *MODELS[m], *PIPE]) for m in ("baseline", "mhc", "moe")]
    four += [(root / "pipe2x2/moe_ep", [*COMMON, *MOE, *PIPE, "engine.expert_parallel=2"])]
    four += [
        (
            root / "ep2x2",
            [*COMMON, *MOE, "engine.expert_parallel=2", "trainer.micro_batch_size=2", "trainer.eval_batches=1"],
        )
    ]  # the reference's 8 validation sequences
    init4 = [(root / f"init/{name}", [*COMMON, *MHC_MOE, *o]) for name, o in INIT4.items()]
    status.update(train_jobs(four + init4, nproc=4, dump_init=tuple(d for d, _ in init4)))
    assert all(s == 0 for s in status.values()), status
    for m, o in [*MODELS.items(), ("bf16", BF16)]:
        train(root / f"ref/{m}", *COMMON, *o)
    return root


def _numbers(run: Path) -> list[tuple[int, int, float, float]]:
    return [(r["step"], r["samples"], r["loss"], r["grad_norm"]) for r in train_rows(run)]


def _assert_same(a: Path, b: Path, rel: float, norm_rel: float | None = None) -> None:
    x, y = _numbers(a), _numbers(b)
    assert [r[:2] for r in x] == [r[:2] for r in y] and len(x) == 4, (x, y)
    for (_, _, loss_a, norm_a), (_, _, loss_b, norm_b) in zip(x, y):
        assert loss_b == pytest.approx(loss_a, rel=rel), (x, y)
        assert norm_b == pytest.approx(norm_a, rel=norm_rel or rel), (x, y)


@pytest.mark.parametrize("model", [*MODELS, "bf16"])
def test_two_stages_reproduce_the_unpipelined_model(runs, model):
    """fp32 at rel 1e-5; bf16 + ZeRO-1 at rel 1e-3 (bf16 keeps 8 bits of mantissa: a different summation order,
    here thread counts, shows at 1e-4)."""
    _assert_same(runs / f"ref/{model}", runs / f"pipe/{model}", rel=1e-3 if model == "bf16" else 1e-5)


@pytest.mark.parametrize("model", ["baseline", "mhc", "moe", "moe_ep"])
def test_two_stages_by_two_data_parallel_reproduce_the_unpipelined_model(runs, model):
    _assert_same(runs / f"ref/{'moe' if model == 'moe_ep' else model}", runs / f"pipe2x2/{model}", rel=1e-5)


@pytest.mark.parametrize("name, whole", [("pipe_resume", "pipe/mhc"), ("pipe_bf16_resume", "pipe/bf16"),
                                         ("ep_resume", "ep2/zero1/fp32")])  # fmt: skip
def test_an_interrupted_run_resumes_to_identical_losses(runs, name, whole):
    assert _numbers(runs / name) == _numbers(runs / whole)


def _all_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    out = {}

    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith("rng_rank"):
            tensor_paths(out=out, prefix=f.name, x=torch.load(f, map_location="cpu", weights_only=True))
    return out


def test_a_spike_is_vetoed_under_a_pipeline(runs):
    run = runs / "pipe_veto"
    rows = train_rows(run)
    assert rows[-1]["step"] == 14 and rows[-1]["update_skipped"] == 1
    before, after = _all_tensors(run / "checkpoints/step_00000013"), _all_tensors(run / "checkpoints/step_00000014")
    assert before.keys() == after.keys() and any(k.startswith("layer_") for k in before)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # every stage's weights and moments
    earlier = _all_tensors(run / "checkpoints/step_00000012")
    assert not all(torch.equal(earlier[k], before[k]) for k in before)  # a normal step does change them


@pytest.mark.parametrize("stage, dtype", EP_CASES)
def test_expert_parallel_reproduces_one_rank_holding_every_expert(runs, stage, dtype):
    """Losses: fp32 at rel 1e-5, bf16 at rel 1e-4. Gradient norms at rel 1e-4 (bf16 1e-3): an expert sums its
    tokens' gradients in another order when they arrive by all-to-all, and after two Adam steps that shows at 3e-5
    in the norm."""
    rel, norm_rel = (1e-5, 1e-4) if dtype == "fp32" else (1e-4, 1e-3)
    _assert_same(runs / f"ep1/{stage}/{dtype}", runs / f"ep2/{stage}/{dtype}", rel, norm_rel)


def test_expert_parallel_on_four_ranks_holds_half_the_experts_per_rank(runs):
    """2 EP groups of 2 ranks, expert-data-parallel pairs: same numbers as one rank; each rank saved its half."""
    _assert_same(runs / "ref/moe", runs / "ep2x2", 1e-5, 1e-4)
    val = [val_rows(runs / d)[-1]["val_loss"] for d in ("ref/moe", "ep2x2")]
    assert val[1] == pytest.approx(val[0], rel=1e-5)
    tag = runs / "ep2x2/checkpoints/step_00000004"
    halves = [torch.load(tag / f"state_rank{r}.pt", weights_only=True)["local_experts"]["params"] for r in range(4)]
    experts = [sorted({int(n.split(".experts.")[1].split(".")[0]) for n in h}) for h in halves]
    assert experts == [[0, 1], [2, 3], [0, 1], [2, 3]]  # data-parallel index d holds experts of d % 2
    name = "blocks.1.mlp.experts.0.w_up.weight"
    assert torch.equal(halves[0][name], halves[2][name])  # replicas of one expert agree


def test_two_ranks_resumed_on_one_keep_the_global_batch(runs, tmp_path):
    """Only trainer.global_batch_size is set: on one rank, accumulation doubles and the sample stream goes on."""
    split = runs / "dp/split"
    train(split, *COMMON, *RESUME)
    whole, resumed = _numbers(runs / "dp/whole"), _numbers(split)
    assert [r[:2] for r in resumed] == [r[:2] for r in whole] == [(s, 8 * s) for s in range(1, 5)]
    for a, b in zip(whole, resumed):
        assert b[2] == pytest.approx(a[2], rel=1e-5) and b[3] == pytest.approx(a[3], rel=1e-5)


@pytest.mark.parametrize("layout, ranks", [*((name, 2) for name in INIT), *((name, 4) for name in INIT4)])
def test_initial_weights_are_bit_identical_on_every_layout(runs, layout, ranks):
    """Each rank materializes only its part (its stage, its experts, its ZeRO-3 shard); together they are the
    single-process model's initial weights, bit for bit, and no rank holds all of them where the layout splits."""
    cfg = composed(*TINY, *COMMON, *MHC_MOE)
    cfg.model.vocab_size = cfg.data.tokenizer.vocab_size
    reference = {n: p.detach() for n, p in Transformer(cfg.model, init_seed=cfg.trainer.seed).named_parameters()}
    dumps = [torch.load(runs / f"init/{layout}/init_rank{r}.pt", weights_only=True) for r in range(ranks)]
    union = {n: t for d in dumps for n, t in d.items()}
    assert union.keys() == reference.keys()
    assert [n for n in reference if not all(torch.equal(d[n], reference[n]) for d in dumps if n in d)] == []
    if not layout.startswith("zero3"):
        assert all(len(d) < len(reference) for d in dumps)


def test_each_pipeline_stage_materializes_only_its_part(runs):
    total = sum(p.numel() for p in Transformer(composed(*TINY, "model.vocab_size=4096").model).parameters())
    counts = []
    for r in range(2):
        log = (runs / "pipe/baseline" / f"stdout_rank{r}.log").read_text()
        counts += [int(c.replace(",", "")) for c in re.findall(rf"rank {r} materialized ([\d,]+) parameters", log)]
    assert len(counts) == 2 and all(0 < c < total for c in counts) and sum(counts) == total, (counts, total)
