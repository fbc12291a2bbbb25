"""Per-document spike attribution: rows cut into their documents, documents ranked by their contribution to the
batch's loss; and, end to end, a poisoned document planted in a corpus ranked first by the spike's forensics
(bench/attribution.py runs 20 trials; two here)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.attribution import trial
from stabletrain.data.build import build_data
from stabletrain.monitoring.attribution import rank_documents
from tests.helpers import REPO, TINY, composed


def test_documents_are_ranked_by_their_loss_above_the_batch_mean():
    # Row 0: document 3 (2 targets) then document 4 (3); row 1: document 9 (5 targets, hard: 9.0 per token).
    loss = torch.tensor([[6.0, 6.0, 5.0, 5.0, 5.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    docs = np.array([[3, 3, 4, 4, 4], [9, 9, 9, 9, 9]])
    ranked = rank_documents(loss, ["a", "b"], docs, torch.zeros(2, 6, dtype=torch.long))
    mean = loss.mean().item()  # 7.2
    assert [(d["source"], d["record"]) for d in ranked] == [("b", 9), ("a", 3), ("a", 4)]
    assert ranked[0]["contribution"] == pytest.approx(5 * (9.0 - mean))
    assert ranked[1]["contribution"] == pytest.approx(2 * (6.0 - mean)) and ranked[2]["tokens"] == 3
    assert ranked[0]["loss_share"] == pytest.approx(45 / loss.sum().item()) and ranked[0]["rows"] == [1]
    assert sum(d["contribution"] for d in ranked) == pytest.approx(0.0, abs=1e-9)


def test_a_row_is_cut_into_documents_at_each_eos():
    cfg = composed(*TINY)
    data = build_data(cfg.data, cfg.trainer.seed, True)
    eos = data.tokenizer.eos_id
    tokens = np.asarray(data.train.tokens)
    boundary = int(np.flatnonzero(tokens == eos)[3])  # the end of document 3
    sample = boundary // cfg.data.seq_len  # a sample whose targets include that EOS, unless it is its first token
    sources, docs = data.documents([sample])
    targets = np.arange(cfg.data.seq_len) + sample * cfg.data.seq_len + 1
    expected = np.where(targets <= boundary, 3, 4)
    assert sources == ["shakespeare"] and (docs[0] == expected).all()


@pytest.mark.slow
def test_a_poisoned_document_is_ranked_first_by_the_spikes_forensics(tmp_path: Path):
    tokenizer = tmp_path / "tokenizer/plays.model"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(next((REPO / "data/shakespeare/tokenizer").glob("sp4096-*.model")).read_bytes())
    rng = random.Random(7)
    result = trial(tmp_path, 11, rng, tokenizer)  # one seed; bench/attribution.py runs 20 (19 ranked first)
    assert result["hit"], result
