"""Tokenizers: sentencepiece models (trained here on any source, or an existing .model) and Hugging Face
`tokenizers` directories. Training writes `<name>.json` next to the model: vocab size, BOS/EOS ids, sha256,
source. The command line is stabletrain.cli.tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as FastTokenizer

from stabletrain import StableTrainError
from stabletrain.data.sources import iter_texts


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """Thin wrapper over a sentencepiece model with the ids the packer needs."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        path = Path(path)
        self.num_threads = num_threads  # None: sentencepiece's default (all cores); prepare's workers use 1 each
        if not path.is_file():
            raise StableTrainError(f"tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises bare RuntimeErrors on corrupt files
            raise StableTrainError(f"cannot load tokenizer {path}: {e}") from None
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise StableTrainError(f"tokenizer {path} has no EOS piece: documents could not be separated")
        self.sha256 = file_sha256(path)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.num_threads) if self.num_threads else self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, as `transformers` saves it), through `tokenizers`.
    BOS/EOS come from tokenizer_config.json or special_tokens_map.json (strings or {"content": ...})."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise StableTrainError(f"{path} is not a Hugging Face tokenizer directory (no tokenizer.json)")
        try:
            self.tok = FastTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise StableTrainError(f"cannot load tokenizer {path / 'tokenizer.json'}: {e}") from None
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                special.update({k: v for k, v in json.loads((path / name).read_text()).items() if v is not None})
        self.bos_id, self.eos_id = self._token_id(special.get("bos_token")), self._token_id(special.get("eos_token"))
        if self.eos_id is None:
            raise StableTrainError(
                f"tokenizer {path} defines no eos_token (tokenizer_config.json or "
                "special_tokens_map.json): documents could not be separated"
            )
        self.bos_id = -1 if self.bos_id is None else self.bos_id
        files = [path / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
        self.sha256 = file_sha256(*[f for f in files if f.is_file()])

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # No template (no BOS added): documents are joined with EOS by the packer, the same for every tokenizer.
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def encode_documents(texts: Iterable[str], tokenizer, batch: int = 64) -> Iterable[np.ndarray]:
    """Each document's ids followed by EOS (how documents are joined: a long one simply spans several samples)."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) >= batch:
            for ids in tokenizer.encode(pending):
                yield np.asarray(ids + [tokenizer.eos_id], dtype=np.int64)
            pending.clear()
    if pending:
        for ids in tokenizer.encode(pending):
            yield np.asarray(ids + [tokenizer.eos_id], dtype=np.int64)


def load_tokenizer(path: str | os.PathLike, num_threads: int | None = None) -> Tokenizer | HFTokenizer:
    """A sentencepiece .model file, or a Hugging Face tokenizer directory."""
    return HFTokenizer(path) if Path(path).is_dir() else Tokenizer(path, num_threads)


def _paragraphs(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    # Sentencepiece trains on "sentences"; paragraphs keep newlines inside pieces of text it sees.
    for text in texts:
        for para in text.split("\n\n"):
            if para.strip():
                yield para[:max_chars]


# Byte fallback, no normalisation, newlines as pieces: the model round-trips any text exactly.
_SENTENCEPIECE = dict(
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    split_digits=True,
    user_defined_symbols=["\n"],
    max_sentence_length=8192,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
)


def train_tokenizer(
    files: Iterable[str] | None,
    out: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    texts: Iterable[str] | None = None,
    source: object = None,
) -> Path:
    """Train a byte-fallback sentencepiece model that round-trips text exactly (newlines included), on the
    documents of `files` or on `texts` (any document stream, e.g. a sample of a hub dataset)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in files] if files is not None else []
    counted = {"docs": 0}

    def counting(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            counted["docs"] += 1
            yield text

    stream = counting(texts if texts is not None else iter_texts(files, text_field))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = Path(tmp) / "sp"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_paragraphs(stream, 8192),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                num_threads=os.cpu_count() or 1,
                **_SENTENCEPIECE,
            )
        except RuntimeError as e:  # e.g. a vocabulary larger than the text can support
            if counted["docs"] == 0:
                raise StableTrainError(
                    "no documents to train the tokenizer on: the source is empty, or every "
                    "document is held out for validation (data.source.val_docs)"
                ) from None
            raise StableTrainError(
                f"sentencepiece could not train a {vocab_size}-piece tokenizer on "
                f"{counted['docs']} documents: {str(e).splitlines()[-1]}"
            ) from None
        os.replace(f"{prefix}.model", out)  # atomic: a concurrent reader never sees half a file
    tok = Tokenizer(out)
    meta = {
        "vocab_size": tok.vocab_size,
        "model_type": model_type,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "sha256": tok.sha256,
        "sources": files or source,
        "train_docs": counted["docs"],
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
