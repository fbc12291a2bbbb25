"""On-the-fly tokenization, cached: one split of a source becomes one int32 array (each document followed by EOS)
saved beside the tokenizer as tokens-<key>.npy, the key derived from the tokenizer and the source's fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from stabletrain.data.sources import DocumentStream, files_stream
from stabletrain.data.tokenizer import encode_documents


def cache_key(stream: DocumentStream, tokenizer) -> str:
    """A sentencepiece model's bytes (what the bundled corpus's caches were written with), else the tokenizer's
    hash; then what the source says determines the stream's documents (SourceConfig.cache_text)."""
    h = hashlib.sha256(tokenizer.path.read_bytes() if tokenizer.path.is_file() else tokenizer.sha256.encode())
    h.update(stream.src.cache_text(stream.fingerprint).encode())
    return h.hexdigest()[:16]


def _cached(cache: Path, texts: Iterable[str], tokenizer, meta: dict) -> np.ndarray:
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    pieces = list(encode_documents(texts, tokenizer))
    tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    cache.with_suffix(".json").write_text(json.dumps({**meta, "tokens": int(tokens.size)}) + "\n")
    return tokens


def tokenize_stream(stream: DocumentStream, tokenizer, cache_dir: Path) -> np.ndarray:
    """One split of a source tokenized on the fly (documents joined with EOS), cached by what determines it."""
    cache = cache_dir / f"tokens-{cache_key(stream, tokenizer)}.npy"
    return _cached(cache, stream, tokenizer, {"files": list(stream.source.files), "source": stream.fingerprint})


def tokenize_files(files: list[str], tokenizer, text_field: str, cache_dir: Path) -> np.ndarray:
    """All documents of `files`, each followed by EOS, as one int32 array; cached by content key."""
    return tokenize_stream(files_stream(files, text_field), tokenizer, cache_dir)
