"""Trained models leave the framework: exports that transformers loads with the same logits and greedy tokens,
consolidation from sharded layouts, the tokenizer, generation with a KV cache, and evaluation that agrees with
lm-evaluation-harness."""

import json
import subprocess

import pytest
import torch

from stabletrain.interop.evaluate import documents, evaluate, lm_eval_task, rolling_windows
from stabletrain.interop.export import export
from stabletrain.interop.generate import Sampling, generate
from stabletrain.interop.hf_tokenizer import hf_tokenizer
from stabletrain.interop.run import load_run
from tests.helpers import PYTHON, env, run_module, train, train_jobs

pytestmark = pytest.mark.slow

MOE = ["model=moe", "model.ffn.n_routed=4", "model.ffn.expert_hidden=32", "model.ffn.top_k=2"]
MODELS = {
    "baseline": [],
    "hc": ["model=hc"],
    "mhc": ["model=mhc"],
    "lns": ["model=lns"],
    "moe": [*MOE, "model/ffn/router=aux_free"],
}
SHORT = ["trainer.max_steps=3", "trainer.eval_interval=0", "trainer.ckpt_interval=3", "logging=none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for name, extra in MODELS.items():
        train(root / name, *SHORT, *extra)
    return root


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    for name in MODELS:
        export(load_run(runs / name), out / name, "hf")
    return out


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_export_gives_the_same_logits_and_greedy_tokens(runs, exports, name):
    ours, theirs = load_run(runs / name).model(), _hf(exports / name)
    expected_class = "LlamaForCausalLM" if name == "baseline" else "StableTrainForCausalLM"
    assert type(theirs).__name__ == expected_class
    ids = torch.randint(3, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    mine = generate(ours, ids[:1], greedy)  # KV cache
    assert torch.equal(mine, generate(ours, ids[:1], greedy, use_cache=False))
    hf = theirs.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(hf[:, ids.shape[1] :], mine)


def test_the_baseline_export_loads_without_stabletrain(runs, exports, tmp_path):
    ids = torch.randint(3, 4000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_run(runs / "baseline").model()(ids)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stabletrain":
            raise ImportError("stabletrain is hidden")
sys.meta_path.insert(0, Hide())
try:
    import stabletrain
    raise SystemExit("stabletrain importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
e = torch.load({str(tmp_path / "expected.pt")!r})
m = AutoModelForCausalLM.from_pretrained({str(exports / "baseline")!r}, dtype=torch.float32).eval()
with torch.no_grad():
    print(float((m(e["ids"]).logits - e["logits"]).abs().max()))
"""
    proc = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-4


def test_the_exported_tokenizer_encodes_like_sentencepiece(runs, exports):
    from transformers import AutoTokenizer

    run = load_run(runs / "baseline")
    tok = AutoTokenizer.from_pretrained(exports / "baseline")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(run.tokenizer_path))
    texts = [t for _, t in documents(run.data_cfg, None)]
    assert texts
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.eos_token_id == sp.eos_id() and hf_tokenizer(run.tokenizer_path, 64).vocab_size == sp.get_piece_size()


def test_sharded_layouts_export_the_same_weights_as_one_process(tmp_path):
    two = ["trainer.micro_batch_size=4", *SHORT]
    jobs = [
        (tmp_path / "zero3", [*two, "engine=zero3"]),
        (tmp_path / "ep2", [*two, *MOE, "engine=zero1", "engine.expert_parallel=2"]),
        (tmp_path / "pipe2", [*SHORT, "model=mhc", "engine.pipeline_stages=2"]),  # one replica of micro 8
    ]
    assert set(train_jobs(jobs, nproc=2).values()) == {0}
    train(tmp_path / "zero3_ref", *SHORT)
    train(tmp_path / "ep2_ref", *SHORT, *MOE)
    train(tmp_path / "pipe2_ref", *SHORT, "model=mhc")
    for name in ("zero3", "ep2", "pipe2"):
        sharded, single = load_run(tmp_path / name), load_run(tmp_path / f"{name}_ref")
        assert sharded.weights.keys() == single.weights.keys()
        for key, value in single.weights.items():
            # The runs agree to float rounding (losses ~1e-7); Adam turns that into differences of up to ~lr on
            # parameters whose gradient is near zero. A wrong shard order or name would be off by ~100%.
            err = float((sharded.weights[key] - value).norm() / value.norm())
            assert err < 2e-3, (name, key, err)
        out = tmp_path / f"{name}_export"
        export(sharded, out, "safetensors")
        assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


def test_evaluate_agrees_with_lm_evaluation_harness(runs, exports, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    run = load_run(runs / "baseline")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(run.tokenizer_path))
    texts = [t[:4000] for _, t in documents(run.data_cfg, 2)]  # two documents, 4000 characters each
    lm_eval_task(texts, tmp_path)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = evaluate(run.model(), _local(run.data_cfg, tmp_path / "docs.jsonl"), sp.encode, sp.eos_id(), progress=False)
    result = simple_evaluate(
        model="hf",
        model_args=f"pretrained={exports / 'baseline'},prefix_token_id={sp.eos_id()},dtype=float32",
        tasks=["stabletrain_val"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu",
    )
    theirs = result["results"]["stabletrain_val"]["bits_per_byte,none"]
    mine = ours["all"].nll / torch.log(torch.tensor(2.0)).item() / ours["all"].bytes
    assert mine == pytest.approx(theirs, rel=5e-3)


def _local(data_cfg, path):
    """The run's data config reading `path` as its validation split."""
    from tests.helpers import composed

    cfg = composed("data=local", f"data.source.train_files=[{path}]", f"data.source.val_files=[{path}]",
                   f"data.seq_len={data_cfg.seq_len}").data  # fmt: skip
    return cfg


def test_rolling_windows_predict_every_token_once():
    ids = list(range(10, 33))
    windows = list(rolling_windows(ids, 0, 8))
    assert [t for _, ts in windows for t in ts] == ids
    assert all(len(x) <= 8 and len(ts) <= len(x) for x, ts in windows)
    assert windows[0][0][0] == 0 and windows[-1][0] == ids[-9:-1]  # the last window sees a full context


def test_bad_input_is_one_line(runs, exports, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs / "baseline" / "config.yaml").read_text())
    cases = [
        (("stabletrain.export", str(empty), f"out={tmp_path / 'x'}"), "holds no complete checkpoint"),
        (("stabletrain.export", str(runs / "baseline"), f"out={tmp_path / 'y'}", "format=onnx"), "format=onnx"),
        (("stabletrain.export", str(runs / "baseline"), f"out={exports / 'baseline'}"), "already exists"),
    ]
    for args, needle in cases:
        proc = run_module(args[0], list(args[1:]))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stabletrain:")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_generate_and_evaluate_commands(runs):
    sampling = ["prompt=ROMEO:", "max_new_tokens=8", "temperature=0"]
    proc = run_module("stabletrain.generate", [str(runs / "baseline"), *sampling])
    assert proc.returncode == 0 and proc.stdout, proc.stderr  # a 3-step model continues with newlines
    proc = run_module("stabletrain.evaluate", [str(runs / "baseline"), "max_docs=1", "data.seq_len=32"])
    assert proc.returncode == 0, proc.stderr
    assert "ppl=" in proc.stdout and "bpb=" in proc.stdout
