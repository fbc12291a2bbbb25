"""Sentencepiece tokenizer: train on a corpus once, cache the model next to the data, reuse it.

    python -m stabletrain.data.tokenizer --input data/shakespeare/train.jsonl \
        --out data/shakespeare/tokenizer/sp4096.model --vocab-size 4096
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from stabletrain import StableTrainError
from stabletrain.data.sources import iter_texts


class Tokenizer:
    """Thin wrapper over a sentencepiece model with the ids the packer needs."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise StableTrainError(f"tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises bare RuntimeErrors on corrupt files
            raise StableTrainError(f"cannot load tokenizer {path}: {e}") from None
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _paragraphs(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    # Sentencepiece trains on "sentences"; paragraphs keep newlines inside pieces of text it sees.
    for text in texts:
        for para in text.split("\n\n"):
            if para.strip():
                yield para[:max_chars]


def train_tokenizer(files: Iterable[str], out: str | os.PathLike, vocab_size: int, model_type: str = "bpe",
                    text_field: str = "text") -> Path:
    """Train a byte-fallback sentencepiece model that round-trips text exactly (newlines included)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            sentence_iterator=_paragraphs(iter_texts(files, text_field), 8192),
            model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["\n"],
            max_sentence_length=8192, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(f"{prefix}.model", out)  # atomic: a concurrent reader never sees half a file
    meta = {"vocab_size": vocab_size, "model_type": model_type, "bos_id": 1, "eos_id": 2, "sources": [str(f) for f in files]}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer on jsonl or text files.")
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    path = train_tokenizer(args.input, args.out, args.vocab_size, args.model_type, args.text_field)
    print(f"wrote {path} (vocab {Tokenizer(path).vocab_size})")


if __name__ == "__main__":
    main()
