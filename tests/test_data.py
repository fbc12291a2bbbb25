import json

import numpy as np
import pytest

from stabletrain import StableTrainError
from stabletrain.data.loader import RankLoader
from stabletrain.data.order import GlobalOrder
from stabletrain.data.packing import PackedSequences
from stabletrain.data.sources import iter_texts
from stabletrain.data.token_cache import tokenize_files
from stabletrain.data.tokenizer import Tokenizer, train_tokenizer
from tests.helpers import REPO

TRAIN = str(REPO / "data/shakespeare/train.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return Tokenizer(train_tokenizer([TRAIN], path, vocab_size=1024))


def test_bundled_corpus_is_real_text():
    docs = [json.loads(line) for line in open(TRAIN)]
    assert len(docs) >= 30
    assert sum(len(d["text"]) for d in docs) > 4_000_000
    assert any("To be, or not to be" in d["text"] for d in docs)


def test_tokenizer_round_trips_text_exactly(tokenizer, tmp_path):
    texts = list(iter_texts([TRAIN]))[:3]
    assert [tokenizer.decode(ids) for ids in tokenizer.encode(texts)] == texts
    assert tokenizer.vocab_size == 1024 and tokenizer.eos_id == 2
    meta = json.loads(tokenizer.path.with_suffix(".json").read_text())
    assert meta["bos_id"] == 1 and meta["eos_id"] == 2


def test_token_cache_is_reused_and_documents_end_with_eos(tokenizer, tmp_path):
    tokens = tokenize_files([TRAIN], tokenizer, "text", tmp_path)
    assert tokens[-1] == tokenizer.eos_id
    assert (tokens == tokenizer.eos_id).sum() == sum(1 for _ in open(TRAIN))
    caches = list(tmp_path.glob("tokens-*.npy"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    again = tokenize_files([TRAIN], tokenizer, "text", tmp_path)
    assert caches[0].stat().st_mtime_ns == mtime and np.array_equal(tokens, again)


def test_missing_text_field_and_missing_file_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(StableTrainError, match="no field 'text'"):
        list(iter_texts([str(bad)]))
    with pytest.raises(StableTrainError, match="not found"):
        list(iter_texts([str(tmp_path / "missing.jsonl")]))
    with pytest.raises(StableTrainError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "none.model")


def test_packed_sequences_shift_by_one():
    data = PackedSequences(np.arange(100, dtype=np.int32), seq_len=10)
    assert len(data) == 9
    batch = data.get(np.array([0, 3]))
    assert batch.shape == (2, 11)
    assert batch[1].tolist() == list(range(30, 41))


def test_global_order_is_a_fresh_permutation_each_epoch_and_deterministic():
    order = GlobalOrder(50, seed=7)
    epoch0, epoch1 = order(np.arange(50)), order(np.arange(50, 100))
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(GlobalOrder(50, seed=7)(np.arange(100)), np.concatenate([epoch0, epoch1]))
    assert not np.array_equal(GlobalOrder(50, seed=8)(np.arange(50)), epoch0)


@pytest.mark.parametrize("accum", [1, 3])
def test_two_ranks_see_exactly_the_samples_of_one_rank(accum):
    data = PackedSequences(np.arange(5000, dtype=np.int32), seq_len=4)
    order = GlobalOrder(len(data), seed=3)
    one = RankLoader(data, order, micro_batch_size=4, accum=accum, rank=0, world_size=1)
    two = [RankLoader(data, order, micro_batch_size=2, accum=accum, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        seen_one = {tuple(row.tolist()) for b in one.next_batch() for row in b}
        seen_two = {tuple(row.tolist()) for loader in two for b in loader.next_batch() for row in b}
        assert seen_one == seen_two and len(seen_one) == 4 * accum
    assert one.samples_consumed == two[0].samples_consumed == two[1].samples_consumed == 5 * 4 * accum
