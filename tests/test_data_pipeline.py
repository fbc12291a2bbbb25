"""The cluster-scale data pipeline (issue 5): sources, tokenizers, prepare, pretokenized shards, packing and
document masks, mixtures, resharded resume, bad input. Everything runs on real files through `datasets`."""

import hashlib
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from stabletrain import StableTrainError
from stabletrain.config import ConfigError, DataConfig
from stabletrain.data.build import build_data, data_config_from_dict, ensure_tokenizer, tokenizer_path
from stabletrain.data.loader import RankLoader
from stabletrain.data.packing import document_ids
from stabletrain.data.prepare import KILL_AFTER_ENV, prepare
from stabletrain.data.shards import PreparedDir, pick_dtype
from stabletrain.data.sources import HubSourceConfig, LocalSourceConfig, open_source
from stabletrain.data.token_cache import cache_key
from stabletrain.data.tokenizer import HFTokenizer, load_tokenizer
from tests.helpers import PYTHON, REPO, compose_data, env, read_jsonl, train, train_rows

TRAIN = REPO / "data/shakespeare/train.jsonl"
SEQ = 64


def plays() -> list[dict]:
    return [json.loads(line) for line in TRAIN.read_text().splitlines()]


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return ensure_tokenizer(compose_data([]))  # trains the bundled sp4096 model on first use


TOK = None  # a private copy of the bundled model: token caches of the tests' files land beside it, not in data/


@pytest.fixture(scope="module", autouse=True)
def private_tokenizer(tmp_path_factory, bundled_tokenizer):
    global TOK
    TOK = tmp_path_factory.mktemp("tok") / "sp4096.model"
    shutil.copy(bundled_tokenizer.path, TOK)
    shutil.copy(bundled_tokenizer.path.with_suffix(".json"), TOK.with_suffix(".json"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled plays written as two jsonl files, a parquet file and one text file per play."""
    root = tmp_path_factory.mktemp("corpus")
    docs = plays()
    for name, part in (("a", docs[:20]), ("b", docs[20:])):
        (root / "jsonl").mkdir(exist_ok=True)
        (root / "jsonl" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    (root / "parquet").mkdir()
    pq.write_table(
        pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}),
        root / "parquet" / "plays.parquet",
        row_group_size=8,
    )
    (root / "zst").mkdir()  # compressed jsonl, as the Pile ships (jsonl.zst) and as C4 ships (json.gz)
    for name, part in (("a", docs[:20]), ("b", docs[20:])):
        payload = "".join(json.dumps(d) + "\n" for d in part).encode()
        (root / "zst" / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    (root / "txt").mkdir()
    for i, d in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(d["text"])
    return root


def local(path, *overrides, tok=None) -> DataConfig:
    tok_path = tok or TOK
    return compose_data(
        [
            "data=local",
            f"data.path={path}",
            f"data.tokenizer.path={tok_path}",
            "data.source.val_docs=3",
            f"data.seq_len={SEQ}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bundled_tokenizer):
    """The bundled corpus pre-tokenized by 2 worker processes into shards of 4 plays."""
    out = tmp_path_factory.mktemp("prepared") / "shakespeare"
    prepare(compose_data(["data.prepare.shard_docs=4", f"data.seq_len={SEQ}"]), out, workers=2, progress=False)
    return out


# ------------------------------------------------------------------ sources and configs
@pytest.mark.parametrize(
    "group,hf_id,subset,field",
    [
        ("c4", "allenai/c4", "en", "text"),
        ("pile", "monology/pile-uncopyrighted", None, "text"),
        ("redpajama", "togethercomputer/RedPajama-Data-1T-Sample", None, "text"),
    ],
)
def test_hub_configs_compose_and_fail_offline_in_one_line(group, hf_id, subset, field):
    cfg = compose_data([f"data={group}"])
    (src,) = cfg.source_configs().values()
    assert (src.hf_id, src.subset, src.text_field) == (hf_id, subset, field)
    with pytest.raises(StableTrainError) as err:
        ensure_tokenizer(cfg)  # no tokenizer yet: it would sample the stream, which needs the hub
    msg = str(err.value)
    assert hf_id in msg and "HF_HUB_OFFLINE" in msg and "unreachable" in msg and "\n" not in msg


def test_mixture_config_composes_with_real_sources():
    cfg = compose_data(["data=mixture"])
    sources = cfg.source_configs()
    assert {n: s.hf_id for n, s in sources.items()} == {
        "c4": "allenai/c4",
        "pile": "monology/pile-uncopyrighted",
        "redpajama": "togethercomputer/RedPajama-Data-1T-Sample",
    }
    assert sum(s.weight for s in sources.values()) == pytest.approx(1.0)
    with pytest.raises(StableTrainError, match="allenai/c4.*HF_HUB_OFFLINE"):
        _ = open_source(sources["c4"], "train").num_shards


def test_train_cli_reports_the_hub_error_in_one_line(tmp_path):
    proc = train(tmp_path / "run", "data=c4", "trainer.max_steps=1", check=False)
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("stabletrain: error:")]
    assert "allenai/c4" in line and "HF_HUB_OFFLINE" in line


def test_local_jsonl_parquet_and_text_yield_the_same_documents(corpus):
    texts = [d["text"] for d in plays()]
    for pattern in ("jsonl/*.jsonl", "zst/*.jsonl.zst", "parquet/*.parquet", "txt/*.txt"):
        stream = open_source(local(corpus / pattern).source_configs()["local"], "train", "replace")
        assert list(stream) == texts[3:], pattern  # the first val_docs=3 documents are held out
        assert list(open_source(stream.src, "val")) == texts[:3]
    assert open_source(local(corpus / "jsonl/*.jsonl").source_configs()["local"], "train").num_shards == 2


def test_plain_local_files_keep_their_token_cache_key(bundled_tokenizer):
    """The key the bundled corpus's caches were written with (before sources had fingerprints of their own): the
    tokenizer's bytes, then each file's path, size and mtime with the text field."""
    stream = open_source(compose_data([]).source_configs()["shakespeare"], "train")
    st = os.stat(TRAIN)
    legacy = hashlib.sha256(bundled_tokenizer.path.read_bytes())
    legacy.update(f"{TRAIN}:{st.st_size}:{st.st_mtime_ns}:text".encode())
    assert cache_key(stream, bundled_tokenizer) == legacy.hexdigest()[:16]


def test_a_run_saved_before_sources_were_a_config_group_still_loads(bundled_tokenizer):
    """config.yaml of an older run: the source's fields (of every kind) on `data` itself. It reads back as a local
    source, and names the same tokenizer."""
    flat = {"kind": None, "hf_id": None, "subset": None, "data_files": [], "split": "train", "val_split": None,
            "train_files": [str(TRAIN)], "val_files": [str(TRAIN.with_name("val.jsonl"))], "val_docs": 200,
            "text_field": "text", "max_docs": None, "weight": 1.0, "name": "shakespeare", "seq_len": 64}  # fmt: skip
    cfg = data_config_from_dict(flat)
    assert isinstance(cfg.source, LocalSourceConfig) and cfg.source.train_files == [str(TRAIN)]
    assert tokenizer_path(cfg) == bundled_tokenizer.path
    hub = data_config_from_dict({**flat, "hf_id": "allenai/c4", "subset": "en", "train_files": [], "val_files": []})
    assert isinstance(hub.source, HubSourceConfig) and hub.source.subset == "en"


def test_missing_files_and_unset_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data=local needs data.path"):
        compose_data(["data=local"])
    with pytest.raises(StableTrainError, match=f"file not found: {tmp_path}/nothing"):
        compose_data(["data=local", f"data.path={tmp_path}/nothing*.jsonl"])
    with pytest.raises(StableTrainError, match="no manifest.json"):
        compose_data(["data.format=pretokenized", f"data.path={tmp_path}"])


# ------------------------------------------------------------------ tokenizers
def test_tokenizer_trains_on_a_sample_of_any_source_and_records_bos_eos(corpus, tmp_path):
    cfg = local(
        corpus / "parquet/*.parquet",
        "data.tokenizer.vocab_size=512",
        "data.tokenizer.train_docs=6",
        tok=tmp_path / "sp512.model",
    )
    tok = ensure_tokenizer(cfg)
    meta = json.loads((tmp_path / "sp512.json").read_text())
    assert (meta["bos_id"], meta["eos_id"], meta["vocab_size"]) == (tok.bos_id, tok.eos_id, 512) == (1, 2, 512)
    assert meta["train_docs"] == 6 and meta["sha256"] == tok.sha256
    text = plays()[0]["text"][:2000]
    assert tok.decode(tok.encode([text])[0]) == text


def make_hf_tokenizer(directory, extra_tokens: int = 0):
    """A real byte-level BPE trained with `tokenizers`, saved as a transformers-style directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        (d["text"] for d in plays()[:5]), trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"])
    )
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return directory


def test_hugging_face_tokenizer_directory(tmp_path, corpus):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)
    text = plays()[1]["text"][:3000]
    assert tok.decode(tok.encode([text])[0]) == text
    data = build_data(local(corpus / "jsonl/*.jsonl", tok=tmp_path / "hf"), seed=0, is_main=True)
    assert data.tokenizer.sha256 == tok.sha256 and int((np.asarray(data.train.tokens) == 1).sum()) == 36
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(StableTrainError, match="defines no eos_token"):
        load_tokenizer(tmp_path / "hf")


# ------------------------------------------------------------------ prepare and the pretokenized format
def test_pretokenized_and_on_the_fly_give_identical_batches(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    train_split = manifest["sources"]["shakespeare"]["splits"]["train"]
    assert manifest["dtype"] == "uint16" and len(train_split["shards"]) == 10 and train_split["docs"] == 39
    assert all(len(s["sha256"]) == 64 for s in train_split["shards"])
    fly = build_data(compose_data([f"data.seq_len={SEQ}"]), seed=5, is_main=True)
    pre = build_data(
        compose_data([f"data.seq_len={SEQ}", "data.format=pretokenized", f"data.path={prepared}"]), seed=5, is_main=True
    )
    assert len(fly.train) == len(pre.train) and len(fly.val) == len(pre.val)
    for step in range(0, 3000, 97):
        ids = np.arange(step * 8, step * 8 + 8)
        assert torch.equal(fly.train.get(fly.order(ids)), pre.train.get(pre.order(ids)))
    assert torch.equal(fly.val.get(np.arange(len(fly.val))), pre.val.get(np.arange(len(pre.val))))
    assert train_split["tokens"] == len(fly.train.tokens)


def test_interrupted_prepare_resumes_to_identical_shards(prepared, tmp_path):
    """SIGKILL the whole prepare (main and workers) after 2 shards; the rerun skips them and ends identical."""
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "stabletrain.cli.prepare", "data.prepare.shard_docs=4", "data.prepare.workers=2", f"out={out}"]
    killed = subprocess.run(
        cmd,
        cwd=REPO,
        env={**env(), KILL_AFTER_ENV: "2"},
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shakespeare/train").glob("*.json")}
    assert 2 <= len(finished) < 10
    resumed = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(finished)} finished shard(s) skipped" in resumed.stdout
    assert {n: (out / "shakespeare/train" / n).stat().st_mtime_ns for n in finished} == finished  # not redone
    ours = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    theirs = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert ours == theirs
    for rel in ours:
        assert (out / rel).read_bytes() == (prepared / rel).read_bytes(), rel


def corrupt_copy(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out, out / "shakespeare/train/00000_00002.bin"


def load_pretokenized(path, *overrides):
    return build_data(
        compose_data([f"data.seq_len={SEQ}", "data.format=pretokenized", f"data.path={path}", *overrides]),
        seed=0,
        is_main=True,
    )


def test_checksum_mismatch_empty_and_missing_shards_are_errors(prepared, tmp_path):
    out, shard = corrupt_copy(prepared, tmp_path)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1  # same size, one bit flipped
    shard.write_bytes(bytes(raw))
    with pytest.raises(StableTrainError, match="checksum mismatch: .*00000_00002.bin"):
        load_pretokenized(out)
    shard.write_bytes(b"")
    with pytest.raises(StableTrainError, match="empty shard: .*00000_00002.bin has 0 bytes"):
        load_pretokenized(out)
    shard.unlink()
    with pytest.raises(StableTrainError, match="shard file missing: .*00000_00002.bin"):
        load_pretokenized(out)


def test_tokenizer_that_does_not_match_the_manifest_is_an_error(prepared, tmp_path, corpus):
    other = ensure_tokenizer(
        local(
            corpus / "jsonl/*.jsonl",
            "data.tokenizer.vocab_size=512",
            "data.tokenizer.train_docs=3",
            tok=tmp_path / "other.model",
        )
    )
    with pytest.raises(StableTrainError, match="tokenizer mismatch: .* was prepared with tokenizer sha256"):
        load_pretokenized(prepared, f"data.tokenizer.path={other.path}")
    # Without a configured tokenizer file the directory's own copy is used.
    data = load_pretokenized(prepared, f"data.tokenizer.path={tmp_path / 'absent.model'}")
    assert data.tokenizer.path.parent == prepared / "tokenizer"


def test_a_prepared_directory_carries_its_tokenizer(tmp_path, corpus, bundled_tokenizer):
    """Prepared with its own tokenizer, the directory trains under the default data group without naming the
    group that produced it; naming a different tokenizer explicitly is still a mismatch."""
    own = local(
        corpus / "jsonl/*.jsonl",
        "data.tokenizer.vocab_size=512",
        "data.tokenizer.train_docs=3",
        tok=tmp_path / "own.model",
    )
    prepare(own, tmp_path / "prepared", workers=1, progress=False)
    data = load_pretokenized(tmp_path / "prepared")  # data=shakespeare (the default), no tokenizer named
    assert data.tokenizer.vocab_size == 512 and data.tokenizer.path.parent == tmp_path / "prepared" / "tokenizer"
    with pytest.raises(StableTrainError, match="tokenizer mismatch"):
        load_pretokenized(tmp_path / "prepared", f"data.tokenizer.path={bundled_tokenizer.path}")


def test_empty_source_and_missing_text_field_are_errors(tmp_path, bundled_tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(StableTrainError, match="yielded no documents"):
        prepare(
            local(tmp_path / "empty.jsonl", "data.source.val_docs=0", f"data.source.val_files=[{TRAIN}]"),
            tmp_path / "out",
            workers=1,
            progress=False,
        )
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(StableTrainError, match=r"body.jsonl: record 0 has no field 'text' \(fields: body"):
        build_data(local(tmp_path / "body.jsonl"), seed=0, is_main=True)


def test_non_utf8_bytes_are_replaced_and_counted_or_rejected(tmp_path, bundled_tokenizer):
    good = plays()[0]["text"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mixed.jsonl").write_bytes(
        json.dumps({"text": good}).encode()
        + b"\n"
        + b'{"text": "caf\xe9 \xff bytes"}\n'
        + json.dumps({"text": plays()[1]["text"]}).encode()
        + b"\n"
    )
    cfg = local(tmp_path / "src" / "*.jsonl", "data.source.val_docs=0", f"data.source.val_files=[{TRAIN}]")
    result = prepare(cfg, tmp_path / "out", workers=1, progress=False)
    split = result["manifest"]["sources"]["local"]["splits"]["train"]
    assert split["docs"] == 3 and split["invalid_utf8_docs"] == 1
    docs = list(open_source(cfg.source_configs()["local"], "train"))
    assert docs[1] == "caf\ufffd \ufffd bytes" and docs[0] == good
    strict = local(tmp_path / "src" / "*.jsonl", "data.source.val_docs=0", "data.utf8_errors=strict")
    with pytest.raises(StableTrainError, match=r"mixed.jsonl: record 1 is not valid UTF-8"):
        list(open_source(strict.source_configs()["local"], "train", "strict"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "latin1.txt").write_bytes(b"caf\xe9\n")
    txt = local(tmp_path / "txt" / "*.txt", "data.source.val_docs=0")
    stream = open_source(txt.source_configs()["local"], "train")
    assert list(stream) == ["caf\ufffd\n"] and stream.invalid_utf8_docs == 1


def test_vocabulary_too_large_for_uint16_is_stored_as_uint32(tmp_path):
    assert pick_dtype(4096) == "uint16" and pick_dtype(65536) == "uint16" and pick_dtype(65537) == "uint32"
    with pytest.raises(StableTrainError, match="uint16 cannot hold token ids up to 70099"):
        pick_dtype(70100, "uint16")
    hf = make_hf_tokenizer(tmp_path / "big", extra_tokens=70000)
    tok = load_tokenizer(hf)
    assert tok.vocab_size > 65536
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "d.jsonl").write_text(json.dumps({"text": "x <extra_69999> y " * 20}) + "\n")
    cfg = local(
        tmp_path / "src" / "d.jsonl",
        "data.source.val_docs=0",
        f"data.source.val_files=[{tmp_path / 'src' / 'd.jsonl'}]",
        "data.seq_len=8",
        tok=hf,
    )
    prepare(cfg, tmp_path / "out", workers=1, progress=False)
    assert PreparedDir(tmp_path / "out").manifest["dtype"] == "uint32"
    tokens = np.asarray(PreparedDir(tmp_path / "out").tokens("local", "train")[np.arange(10)])
    assert tokens.max() == tok.tok.token_to_id("<extra_69999>") > 65535  # not wrapped modulo 2^16
    forced = local(
        tmp_path / "src" / "d.jsonl",
        "data.source.val_docs=0",
        "data.prepare.dtype=uint16",
        f"data.source.val_files=[{tmp_path / 'src' / 'd.jsonl'}]",
        tok=hf,
    )
    with pytest.raises(StableTrainError, match="data.prepare.dtype=uint16 cannot hold"):
        prepare(forced, tmp_path / "out16", workers=1, progress=False)


# ------------------------------------------------------------------ packing and document masks
def test_documents_longer_than_seq_len_span_consecutive_samples(tmp_path, bundled_tokenizer):
    long_doc, short = plays()[2]["text"][:20000], "A short one."
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (short, long_doc, short)))
    cfg = local(tmp_path / "d.jsonl", "data.source.val_docs=0", f"data.source.val_files=[{TRAIN}]")
    data = build_data(cfg, 0, True)
    tok = data.tokenizer
    stream = np.concatenate([ids + [tok.eos_id] for ids in tok.encode([short, long_doc, short])])
    assert len(tok.encode([long_doc])[0]) > 10 * SEQ
    assert np.array_equal(np.asarray(data.train.tokens), stream)  # nothing truncated or dropped
    windows = data.train.get(np.arange(len(data.train)))
    for i, w in enumerate(windows):
        assert w.tolist() == stream[i * SEQ : i * SEQ + SEQ + 1].tolist()
    ids = document_ids(windows[:, :-1], tok.eos_id)
    assert ids[0].max() == 1 and (ids[3] == 0).all()  # window 0 starts in the short doc; window 3 is all long doc


def test_document_mask_keeps_attention_within_documents(bundled_tokenizer):
    from stabletrain.config import ModelConfig
    from stabletrain.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)).eval()
    eos = 2
    x = torch.randint(3, 64, (2, 24))
    x[:, 9] = eos  # document 0 is positions 0..9, document 1 is 10..23
    ids = document_ids(x, eos)
    assert ids[0].tolist() == [0] * 10 + [1] * 14
    y = x.clone()
    y[:, :9] = torch.randint(3, 64, (2, 9))  # change document 0 only
    with torch.no_grad():
        a, b = model(x, doc_ids=ids), model(y, doc_ids=ids)
        assert torch.allclose(a[:, 10:], b[:, 10:], atol=1e-6)  # document 1 does not see document 0
        assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:], atol=1e-6)  # without the mask it does
        assert torch.allclose(model(x, doc_ids=torch.zeros_like(x)), model(x), atol=1e-6)  # one doc = causal


# ------------------------------------------------------------------ mixtures
@pytest.fixture(scope="module")
def mixture_overrides(corpus):
    return [
        "data=local",
        "data.name=mix",
        f"data.seq_len={SEQ}",
        f"data.tokenizer.path={TOK}",
        f"+data.sources.plays={{train_files: ['{corpus}/jsonl/*.jsonl'], val_docs: 3, weight: 0.7}}",
        f"+data.sources.parquet={{train_files: ['{corpus}/parquet/*.parquet'], val_docs: 2, weight: 0.2}}",
        f"+data.sources.text={{kind: local, train_files: ['{corpus}/txt/00*.txt'], val_docs: 1, weight: 0.1}}",
    ]


def test_mixture_proportions_and_determinism(mixture_overrides, bundled_tokenizer):
    data = build_data(compose_data(mixture_overrides), seed=11, is_main=True)
    assert data.names == ["plays", "parquet", "text"]
    ids = data.order(np.arange(10_000))
    source = np.searchsorted(data.train.offsets, ids, side="right") - 1
    share = np.bincount(source, minlength=3) / 10_000
    assert np.allclose(share, [0.7, 0.2, 0.1], atol=0.02), share
    assert np.array_equal(data.order(np.arange(10_000)), ids)  # pure function of (seed, index)
    again = build_data(compose_data(mixture_overrides), seed=11, is_main=True)
    assert np.array_equal(again.order(np.arange(5000, 6000)), ids[5000:6000])
    assert not np.array_equal(build_data(compose_data(mixture_overrides), 12, True).order(np.arange(1000)), ids[:1000])
    counts = data.source_tokens(10_000)
    assert sum(counts.values()) == 10_000 * SEQ
    assert counts == {f"data/tokens/{n}": int((source == i).sum()) * SEQ for i, n in enumerate(data.names)}
    # Each source cycles through its own samples: within a source no sample repeats before all were seen.
    for i, part in enumerate(data.train.parts):
        mine = ids[source == i][: len(part)]
        assert len(np.unique(mine)) == len(mine)


def test_mixture_pretokenized_matches_on_the_fly(mixture_overrides, tmp_path, bundled_tokenizer):
    cfg = compose_data(mixture_overrides)
    prepare(cfg, tmp_path / "mix", workers=1, progress=False)
    fly = build_data(cfg, seed=3, is_main=True)
    pre = build_data(
        compose_data(mixture_overrides + ["data.format=pretokenized", f"data.path={tmp_path / 'mix'}"]),
        seed=3,
        is_main=True,
    )
    ids = np.arange(4000)
    assert torch.equal(fly.train.get(fly.order(ids)), pre.train.get(pre.order(ids)))
    assert torch.equal(fly.val.get(np.arange(50)), pre.val.get(np.arange(50)))


# ------------------------------------------------------------------ resume on a different number of ranks
def run_loader(data, world: int, micro_total: int, steps: int, start: int = 0) -> list[torch.Tensor]:
    """Each step's global batch, assembled from every rank's micro-batches in rank order."""
    loaders = [RankLoader(data.train, data.order, micro_total // world, 2, r, world, start) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [loader.next_batch() for loader in loaders]
        out.append(torch.cat([per_rank[r][m] for m in range(2) for r in range(world)]))
    return out


@pytest.mark.parametrize("kind", ["pretokenized", "mixture"])
def test_resharded_resume_continues_the_same_stream(kind, prepared, mixture_overrides):
    overrides = (
        [f"data.seq_len={SEQ}", "data.format=pretokenized", f"data.path={prepared}"]
        if kind == "pretokenized"
        else mixture_overrides
    )
    data = build_data(compose_data(overrides), seed=9, is_main=True)
    whole = run_loader(data, world=1, micro_total=4, steps=6)
    two = run_loader(data, world=2, micro_total=4, steps=6)
    for a, b in zip(whole, two):  # 2 ranks see exactly the samples of 1 rank, step by step
        assert torch.equal(a, b)
    consumed = 3 * 4 * 2  # after 3 steps of a global batch of 4 x 2 accumulation steps
    for first, then in ((1, 2), (2, 1)):
        resumed = run_loader(data, first, 4, 3) + run_loader(data, then, 4, 3, start=consumed)
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole)), (first, then)


@pytest.mark.slow
def test_torchrun_resume_from_one_rank_on_two_ranks_matches_uninterrupted(prepared, tmp_path):
    common = (
        "trainer.max_steps=4",
        "trainer.ckpt_interval=2",
        "trainer.eval_interval=0",
        "logging=none",
        "data.format=pretokenized",
        f"data.path={prepared}",
    )
    whole = tmp_path / "whole"
    train(whole, *common)
    split = tmp_path / "split"
    train(split, *common, "trainer.stop_at=2")
    train(split, *common, "trainer.resume=auto", "trainer.micro_batch_size=4", nproc=2)
    a, b = train_rows(whole), train_rows(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert (x["tokens"], x["samples"], x["data/tokens/shakespeare"]) == (
            y["tokens"],
            y["samples"],
            y["data/tokens/shakespeare"],
        )
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-4)
    events = read_jsonl(split / "events.jsonl")
    assert [e["checkpoint"].endswith("step_00000002") for e in events if e["kind"] == "resume"] == [True]


def test_held_out_validation_is_fixed_and_disjoint_from_training(corpus):
    data = build_data(local(corpus / "jsonl/*.jsonl"), seed=0, is_main=True)
    other = build_data(local(corpus / "jsonl/*.jsonl"), seed=99, is_main=True)
    val = np.asarray(data.val.tokens)
    assert np.array_equal(val, np.asarray(other.val.tokens))
    first_train_doc = data.tokenizer.encode([plays()[3]["text"]])[0]
    assert np.asarray(data.train.tokens)[: len(first_train_doc)].tolist() == first_train_doc
    assert (val == data.tokenizer.eos_id).sum() == 3
