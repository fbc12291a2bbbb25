"""Malformed input, table-driven: each case is one line naming the key (or the file), before anything heavy.

`cli_error` returns what train.py prints for a set of overrides: the compose-time error (Hydra's structured
configs: unknown keys, wrong types, values outside a closed vocabulary) or validate()'s (ranges, cross-field
rules, paths, the machine). A few cases also run through train.py itself to check the exit status and stderr.
"""

import json
import math
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

from stabletrain import StableTrainError
from stabletrain.config import Config, ConfigError, check_overrides, register, validate
from tests.helpers import REPO, composed, train

register()


def cli_error(*overrides: str) -> str | None:
    error = check_overrides(list(overrides), REPO / "conf")
    if error:
        return error
    try:
        validate(composed(*overrides))
    except ConfigError as e:
        return str(e)
    return None


CASES = [
    # --- compose time: keys, types, vocabularies
    ("model.d_modle=512", "model.d_modle"),
    ("model.d_model=wide", "model.d_model"),
    ("model=no_such_preset", "no_such_preset"),
    ("model/residual=mch", "Could not find 'model/residual/mch'"),
    ("model.residual=mhc", "model.residual='mhc': choose it with model/residual=<name> (one of: hc, mhc, standard)"),
    (
        "model.residual.kind=mhc",
        "model.residual.kind=mhc does not swap the component (standard is selected): use model/residual=mhc",
    ),
    ("model.residual.kernel=fused", "Could not override 'model.residual.kernel'"),
    ("precision.dtype=fp16", "Invalid value 'fp16'"),
    ("optim.schedule=linear", "Invalid value 'linear'"),
    ("trainer.device=tpu", "Invalid value 'tpu'"),
    ("model=mhc model.residual.kernel=cuda", "Invalid value 'cuda'"),
    ("monitor.response=panic", "Invalid value 'panic'"),
    ("monitor.nonfinite.response=log", "Invalid value 'log'"),
    ("data.format=arrow", "Invalid value 'arrow'"),
    ("model=moe model/ffn/router=topk", "Could not find 'model/ffn/router/topk'"),
    ("model=moe model.ffn.router.aux_loss_coef=0.1", "Could not override 'model.ffn.router.aux_loss_coef'"),
    # --- ranges (the audit's tracebacks and silent acceptances first)
    ("optim.lr=-0.001", "optim.lr=-0.001 must be > 0"),
    ("optim.lr=nan", "optim.lr=nan must be finite and > 0"),
    ("optim.lr=inf", "optim.lr=inf must be finite and > 0"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must have 2 entries"),
    ("optim.betas=[0.9,1.5]", "optim.betas entry 1.5 (in [0.9, 1.5]) must be >= 0 and < 1"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("trainer.ckpt_interval=-1", "trainer.ckpt_interval=-1 must be >= 0"),
    ("model.d_model=0", "model.d_model=0 must be >= 1"),
    ("model.n_layers=0", "model.n_layers=0 must be >= 1"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 must be >= 0 and <= 1"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be >= 1"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints=-1 must be >= 0"),
    ("trainer.seed=-1", "trainer.seed=-1 must be >= 0"),
    ("data.seq_len=1", "data.seq_len=1 must be >= 2"),
    ("data.tokenizer.vocab_size=0", "data.tokenizer.vocab_size=0 must be >= 8"),
    ("monitor.loss.sigma=-1", "monitor.loss.sigma=-1.0 must be >= 0"),
    ("monitor.inject.step=0", "monitor.inject.step=0 must be >= 1"),
    ("model.residual.streams=0", "model.residual.streams=0 must be >= 1"),
    ("engine.zero_stage=5", "engine.zero_stage=5 must be >= 0 and <= 3"),
    ("model/signal=bslo model.signal.momentum=1", "model.signal.momentum=1.0 must be >= 0 and < 1"),
    # --- cross-field rules
    ("model.n_heads=3", "model.d_model=256 is not divisible by model.n_heads=3"),
    ("model/attention=gqa", "model/attention=gqa needs model.attention.n_kv_heads"),
    ("model=moe model.ffn.top_k=10", "model.ffn.top_k=10 is more than model.ffn.n_routed=8"),
    ("model=moe model.ffn.router.n_groups=3", "model.ffn.router.n_groups=3 must divide model.ffn.n_routed=8"),
    ("model.residual.streams=4", "model.residual.streams=4 needs a multi-stream residual (model/residual=hc or mhc)"),
    ("model=moe model.ffn.first_dense=9", "model.ffn.first_dense=9 is more than model.n_layers=4"),
    ("model=mhc model.residual.sinkhorn_iters=0", "model.residual.sinkhorn_iters=0 must be >= 1"),
    ("engine.offload_param=cpu", "engine.offload_param needs engine.zero_stage=3"),
    ("engine.offload_optimizer=cpu", "engine.offload_optimizer needs engine.zero_stage >= 1"),
    ("model=moe engine.expert_parallel=3", "model.ffn.n_routed=8 is not divisible by engine.expert_parallel=3"),
    ("engine.expert_parallel=2", "engine.expert_parallel=2 needs MoE layers (model/ffn=moe)"),
    ("trainer.stop_at=1000", "trainer.stop_at=1000 must lie in 1..trainer.max_steps=200"),
    ("trainer.skip_batches=[[5,2]]", "trainer.skip_batches entry [5, 2] must be [start, end)"),
    ("optim.grad_clip=0 optim.grad_clip_warmup_steps=5", "optim.grad_clip_warmup_steps needs optim.grad_clip > 0"),
    (
        "model/signal=bslo model.signal.clamp_min=5 model.signal.clamp_max=2",
        "model.signal.clamp_min=5.0 is above model.signal.clamp_max=2.0",
    ),
    # --- paths
    (
        "data.source.train_files=[/nonexistent/corpus.jsonl]",
        "data.source.train_files: file not found: /nonexistent/corpus.jsonl",
    ),
    ("trainer.resume=/nonexistent/run/checkpoints", "trainer.resume=/nonexistent/run/checkpoints: no such directory"),
    ("data.format=pretokenized", "data.format=pretokenized needs data.path="),
    (
        "data.format=pretokenized data.path=/nonexistent/prepared",
        "data.path=/nonexistent/prepared holds no manifest.json",
    ),
    ("data=local", "data.source.train_files is empty (data=local needs data.path="),
    # --- data sources: a config group (data/source); their fields moved from data to data.source
    ("data/source=ftp", "Could not find 'data/source/ftp'"),
    ("data=c4 data.source.kind=local", "data.source.kind=local does not swap the component (hub is selected)"),
    ("data.text_field=body", "data.text_field is a field of the source: data.source.text_field=body"),
    ("data=c4 data.path=corpus.jsonl", "data.path=corpus.jsonl names local files, which data/source=hub does not"),
    ("data=c4 data.source.hf_id=null", "data.source.hf_id is empty (data/source=hub needs a dataset id"),
]
if not torch.cuda.is_available():
    CASES.append(("trainer.device=cuda", "trainer.device=cuda, but this machine has"))


@pytest.mark.parametrize("overrides, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_the_key(overrides, needle):
    error = cli_error(*overrides.split())
    assert error is not None, f"{overrides} was accepted"
    assert needle in error and "\n" not in error, error


def test_the_table_holds_the_audits_cases_and_more():
    assert len(CASES) + len(DATA_CASES) >= 37 + 10


def test_resume_path_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint (no step_* directory)" in cli_error(f"trainer.resume={tmp_path / 'empty'}")
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(f"trainer.resume={tmp_path / 'file'}")


def test_total_steps_below_max_steps_warns_naming_both():
    warnings = validate(composed("optim.total_steps=50", "trainer.max_steps=100"))
    assert any("optim.total_steps=50 is below trainer.max_steps=100" in w for w in warnings)
    assert validate(composed("trainer.max_steps=100")) == []


def test_bslo_warns_at_start_up():
    assert any("BSLO is experimental" in w for w in validate(composed("model/signal=bslo")))
    assert any("BSLO is experimental" in w for w in validate(composed("model=bslo_moe")))


def _numeric(tp) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or any(_numeric(a) for a in args if a is not type(None))


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def test_every_number_in_the_schema_declares_its_range():
    """The class of error is gone, not just the examples: no int/float field without a range, in the schema and
    in every registered component's config (residual streams, feed-forwards, routers, data sources)."""
    from stabletrain.data.sources import SOURCES
    from stabletrain.models import FEED_FORWARDS, RESIDUAL_STREAMS, ROUTERS

    classes = [Config] + [e.config for reg in (RESIDUAL_STREAMS, FEED_FORWARDS, ROUTERS, SOURCES) for e in reg]
    missing = [
        f"{cls.__name__}.{key}"
        for cls in classes
        for key, tp, f in _walk(cls)
        if _numeric(tp) and "range" not in f.metadata
    ]
    assert missing == [], missing


# --- data-level input: files the pipeline reads (one line naming the file, no traceback from a library)
def _data_error(tmp_path: Path, *overrides: str) -> str:
    from stabletrain.data.build import build_data
    from tests.helpers import compose_data

    try:
        build_data(
            compose_data(
                [*overrides, f"data.tokenizer.path={tmp_path / 'tok' / 'sp.model'}", "data.tokenizer.vocab_size=300"]
            ),
            seed=0,
            is_main=True,
        )
    except StableTrainError as e:
        return str(e)
    raise AssertionError(f"{overrides} was accepted")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


DATA_CASES = [
    ("not_json", b'this is not json\n{"text": "x"}\n', "bad.jsonl", [], "cannot be read as json"),
    (
        "strict_utf8_text",
        b"hello \xff\xfe world\n",
        "bad.txt",
        ["data.utf8_errors=strict", "data.source.val_docs=1"],
        "not valid UTF-8",
    ),
    ("strict_utf8_jsonl", b'{"text": "ok"}\n', "bad.jsonl", ["data.utf8_errors=strict"], None),
    ("missing_field", b'{"body": "text"}\n' * 20, "bad.jsonl", ["data.source.text_field=text"], "has no field 'text'"),
    ("empty_file", b"", "empty.jsonl", [], "empty"),
    ("wrong_field_type", b'{"text": 5}\n' * 20, "bad.jsonl", [], "not text"),
    (
        "all_held_out",
        b'{"text": "a short play"}\n' * 3,
        "small.jsonl",
        ["data.source.val_docs=5"],
        "every document is held out for validation (data.source.val_docs)",
    ),
]


@pytest.mark.parametrize(
    "name, content, filename, extra, needle", [c for c in DATA_CASES if c[4]], ids=[c[0] for c in DATA_CASES if c[4]]
)
def test_bad_data_file_is_one_line_naming_the_file(tmp_path, name, content, filename, extra, needle):
    bad = _write(tmp_path / filename, content)
    val = _write(tmp_path / "val.jsonl", b'{"text": "held out text"}\n' * 5)
    overrides = ["data=local", f"data.path={bad}", *extra]
    if not any(e.startswith("data.source.val_docs=") for e in extra):
        overrides.append(f"data.source.val_files=[{val}]")
    error = _data_error(tmp_path, *overrides)
    assert needle in error and str(bad) in error and "\n" not in error, error


def test_unknown_data_source_kind_is_one_line():
    """A misspelt kind fails at compose time (data/source=ftp, in the table above) or in a mixture's entry; data.kind,
    where the kind was set before sources were a config group, says where it is chosen now."""
    known = "(registered: hub, local)"
    assert cli_error("data.kind=ftp") == f"data.kind=ftp: the source is a config group: use data/source=ftp {known}"
    assert cli_error("+data.sources.x={kind: ftp}") == f"data.sources.x.kind=ftp: no such data source {known}"
    unknown = cli_error("+data.sources.x={hf_id: a/b, path: x}")
    assert unknown.startswith("data.sources.x: unknown key(s) path for a hub source"), unknown


def test_tokenizer_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is a file, so no tokenizer can be written below it" in cli_error(
        f"data.tokenizer.path={tmp_path / 'afile' / 'sp.model'}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lr=nan"], "optim.lr=nan must be finite and > 0"),
        (["optim.betas=[0.9]"], "optim.betas=[0.9] must have 2 entries"),
        (["trainer.resume=/nonexistent/ckpts"], "trainer.resume=/nonexistent/ckpts: no such directory"),
    ],
)
def test_train_py_prints_one_line_and_exits_2(tmp_path, overrides, needle):
    """Through train.py for the first case; what train.py does, in this process, for the others."""
    run = tmp_path / "run"
    proc = train(run, *overrides, "logging=none", subprocess_="nan" in overrides[0], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"stabletrain: error: {needle}")
    assert not (run / "checkpoints").exists()


def test_metrics_reader_and_plots_tolerate_nonfinite_and_torn_lines(tmp_path):
    from stabletrain.analysis.report import read_metrics

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": "nan"}) + "\n" + '{"step": 2, "lo')
    rows = read_metrics(tmp_path)
    assert len(rows) == 1 and math.isnan(rows[0]["loss"])
