"""Everything the trainer needs from the data side, prepared once by rank 0 and read by all ranks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stabletrain.config import DataConfig
from stabletrain.data.dataset import tokenize_files
from stabletrain.data.tokenizer import Tokenizer, train_tokenizer
from stabletrain.engine.distributed import barrier


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray


def prepare_data(cfg: DataConfig, is_main: bool) -> PreparedData:
    tok_path = Path(cfg.tokenizer.path)
    if is_main and not tok_path.is_file():
        print(f"training a {cfg.tokenizer.vocab_size}-piece sentencepiece tokenizer on {len(cfg.train_files)} "
              f"file(s) -> {tok_path}")
        train_tokenizer(cfg.train_files, tok_path, cfg.tokenizer.vocab_size, cfg.tokenizer.model_type, cfg.text_field)
    barrier()
    tokenizer = Tokenizer(tok_path)
    cache_dir = tok_path.parent
    splits = {}
    for split, files in (("train", cfg.train_files), ("val", cfg.val_files)):
        if is_main:  # rank 0 fills the cache; the others read it after the barrier
            splits[split] = tokenize_files(list(files), tokenizer, cfg.text_field, cache_dir)
        barrier()
        if not is_main:
            splits[split] = tokenize_files(list(files), tokenizer, cfg.text_field, cache_dir)
    return PreparedData(tokenizer, splits["train"], splits["val"])
