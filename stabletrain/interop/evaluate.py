"""Per-token loss, perplexity and bits per byte of a trained model on a data config's validation documents.

Each document is scored on its own, as lm-evaluation-harness scores a `loglikelihood_rolling` task: its tokens
follow the end-of-document token (the context every document had in training), and are predicted in windows of
data.seq_len tokens; a window's input is the seq_len tokens before each predicted one, so the last, shorter window
sees a full context. Every token of the document is predicted once.

    loss = NLL / tokens        ppl = exp(loss)        bpb = NLL / ln 2 / UTF-8 bytes of the documents

`lm_eval_task(...)` writes the same documents and a task definition, so that lm-evaluation-harness's
`bits_per_byte` on an export can be compared with ours.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stabletrain import StableTrainError
from stabletrain.config import DataConfig
from stabletrain.data.sources import open_source


def rolling_windows(ids: list[int], prefix: int, length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(model input, the tokens its last positions predict) covering every token of `ids` once."""
    first = min(length, len(ids))
    yield [prefix, *ids[: first - 1]], ids[:first]
    done = first
    while done < len(ids):
        end = min(len(ids), done + length)
        yield ids[end - length - 1 : end - 1], ids[done:end]
        done = end


@dataclass
class Score:
    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0
    docs: int = 0

    def add(self, other: Score) -> None:
        self.nll, self.tokens = self.nll + other.nll, self.tokens + other.tokens
        self.bytes, self.docs = self.bytes + other.bytes, self.docs + other.docs

    def line(self, name: str) -> str:
        loss = self.nll / max(self.tokens, 1)
        bpb = self.nll / math.log(2) / max(self.bytes, 1)
        return f"{name}: docs={self.docs} tokens={self.tokens} loss={loss:.4f} ppl={math.exp(loss):.3f} bpb={bpb:.4f}"


@torch.no_grad()
def score_document(model, text: str, encode, prefix: int, length: int) -> Score:
    ids = encode(text)
    nll = 0.0
    for inputs, targets in rolling_windows(ids, prefix, length):
        out = model(torch.tensor([inputs]))
        logits = (out if torch.is_tensor(out) else out.logits)[0, -len(targets) :].float()
        nll += float(F.cross_entropy(logits, torch.tensor(targets), reduction="sum"))
    return Score(nll, len(ids), len(text.encode("utf-8")), 1)


def documents(cfg: DataConfig, max_docs: int | None) -> Iterator[tuple[str, str]]:
    """(source, text) of the validation split of every source."""
    for name, src in cfg.source_configs().items():
        for i, text in enumerate(open_source(src, "val", cfg.utf8_errors)):
            if max_docs is not None and i >= max_docs:
                break
            if text:
                yield name, text


def evaluate(
    model, cfg: DataConfig, encode, prefix: int, max_docs: int | None = None, progress: bool = True
) -> dict[str, Score]:
    """Score per source and in total ("all")."""
    scores: dict[str, Score] = {}
    total = Score()
    for name, text in tqdm(documents(cfg, max_docs), desc="evaluate", unit="doc", disable=not progress):
        s = score_document(model, text, encode, prefix, cfg.seq_len)
        scores.setdefault(name, Score()).add(s)
        total.add(s)
    if total.docs == 0:  # an empty sum would print loss 0 and ppl 1: a perfect score for nothing
        raise StableTrainError(f"data {cfg.name}: no validation documents to score")
    scores["all"] = total
    return scores


def lm_eval_task(texts: Iterable[str], out_dir: Path, name: str = "stabletrain_val") -> Path:
    """The documents as jsonl and an lm-evaluation-harness task that scores them like `evaluate` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = out_dir / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = out_dir / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs.resolve()}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return task
