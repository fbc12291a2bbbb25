"""Everything the trainer needs from the data side, prepared once by rank 0 and read by all ranks.

Text sources are tokenized on first use into a cache next to the tokenizer; `data.format=pretokenized` reads the
memory-mapped shards of a `prepare` directory instead. Either way each source becomes one token stream cut into
seq_len+1 windows, and the sample order is GlobalOrder (one source) or MixtureOrder (several).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from stabletrain import REPO_ROOT, StableTrainError
from stabletrain.config import DataConfig
from stabletrain.config.source import infer_kind
from stabletrain.data.order import GlobalOrder, MixtureOrder, OrderedView
from stabletrain.data.packing import ConcatSequences, PackedSequences, document_ids
from stabletrain.data.shards import PreparedDir
from stabletrain.data.sources import SOURCES, open_source
from stabletrain.data.token_cache import tokenize_stream
from stabletrain.data.tokenizer import load_tokenizer, train_tokenizer
from stabletrain.distributed import barrier


def tokenizer_path(cfg: DataConfig) -> Path:
    """data.tokenizer.path, or (None) a model cached per source and tokenizer settings under data/<name>/tokenizer/."""
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    key = json.dumps(
        [[n, s.identity()] for n, s in cfg.source_configs().items()]
        + [cfg.tokenizer.vocab_size, cfg.tokenizer.model_type, cfg.tokenizer.train_docs],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return REPO_ROOT / "data" / cfg.name / "tokenizer" / f"sp{cfg.tokenizer.vocab_size}-{digest}.model"


def data_config_from_dict(saved: dict) -> DataConfig:
    """A run's saved `data` node (its config.yaml) as a typed DataConfig. Runs saved before sources were a config
    group carry the source's fields on `data` itself, the fields of every kind."""
    saved, node = dict(saved), OmegaConf.structured(DataConfig)
    if "source" not in saved:
        flat = {k: saved.pop(k) for k in list(saved) if k not in {f.name for f in fields(DataConfig)}}
        kind = infer_kind(flat)
        known = {f.name for f in fields(SOURCES[kind].config)}
        saved["source"] = {**{k: v for k, v in flat.items() if k in known}, "kind": kind}
    kind = saved["source"].get("kind")
    if kind in SOURCES:
        node.source = OmegaConf.structured(SOURCES[kind].config)
    return OmegaConf.to_object(OmegaConf.merge(node, saved))


def ensure_tokenizer(cfg: DataConfig, is_main: bool = True):
    """Load the tokenizer; train a sentencepiece model on a sample of the training source(s) first if missing."""
    path = tokenizer_path(cfg)
    if is_main and not path.exists():
        sources = cfg.source_configs()
        total = sum(s.weight for s in sources.values())
        streams = {name: open_source(src, "train", cfg.utf8_errors) for name, src in sources.items()}
        share = {name: max(1, round(cfg.tokenizer.train_docs * src.weight / total)) for name, src in sources.items()}
        texts = (text for name, stream in streams.items() for text in stream.sample(share[name]))
        print(
            f"training a {cfg.tokenizer.vocab_size}-piece sentencepiece tokenizer on up to "
            f"{cfg.tokenizer.train_docs} documents of {', '.join(sources)} -> {path}"
        )
        try:
            train_tokenizer(
                None,
                path,
                cfg.tokenizer.vocab_size,
                cfg.tokenizer.model_type,
                texts=texts,
                source={n: s.identity() for n, s in sources.items()},
            )
        except StableTrainError as e:
            raise StableTrainError(f"{'; '.join(s.desc for s in streams.values())}: {e}") from None
    barrier()
    return load_tokenizer(path)


@dataclass
class TrainData:
    tokenizer: object
    train: PackedSequences | ConcatSequences
    val: PackedSequences | OrderedView
    order: GlobalOrder | MixtureOrder
    names: list[str]
    seq_len: int
    doc_mask: bool

    def source_tokens(self, samples_consumed: int) -> dict[str, int]:
        """Tokens consumed so far per source (metrics `data/tokens/<source>`): a pure function of the sample count."""
        counts = (
            self.order.consumed_per_source(samples_consumed)
            if isinstance(self.order, MixtureOrder)
            else [samples_consumed]
        )
        return {f"data/tokens/{n}": int(c) * self.seq_len for n, c in zip(self.names, counts)}

    def documents(self, sample_ids: list[int]) -> tuple[list[str], np.ndarray]:
        """(the source of each sample, [rows, seq_len] the document of each target token: its position in that
        source's training stream, 0-based, after any documents held out for validation)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        eos = self.tokenizer.eos_id
        if isinstance(self.train, ConcatSequences):
            which, _ = self.train.source_of(ids)
            return [self.names[w] for w in which], self.train.target_documents(ids, eos)
        return [self.names[0]] * len(ids), self.train.target_documents(ids, eos)

    def model_kwargs(self, batch: torch.Tensor) -> dict:
        """Extra model inputs for a [B, seq_len+1] batch: per-position document ids when data.doc_mask is on."""
        return {"doc_ids": document_ids(batch[:, :-1], self.tokenizer.eos_id)} if self.doc_mask else {}


def _token_streams(cfg: DataConfig, is_main: bool):
    """(tokenizer, {source: (train tokens, val tokens)}) for either format."""
    sources = cfg.source_configs()
    if cfg.format == "pretokenized":
        prepared = PreparedDir(cfg.path)
        tokenizer = prepared.load_tokenizer(str(tokenizer_path(cfg)) if cfg.tokenizer.path else None)
        if is_main:
            prepared.verify(checksums=True)  # rank 0 reads every shard once; the others trust it after the barrier
        barrier()
        names = list(sources) if cfg.sources else prepared.sources
        if not cfg.sources and len(names) != 1:
            raise StableTrainError(
                f"{cfg.path} holds a mixture ({', '.join(names)}): train it with data=mixture and the same data.sources"
            )
        missing = [n for n in names if n not in prepared.sources]
        if missing:
            raise StableTrainError(
                f"{cfg.path} has no source {', '.join(missing)} (it holds {', '.join(prepared.sources)})"
            )
        return tokenizer, {n: (prepared.tokens(n, "train"), prepared.tokens(n, "val")) for n in names}
    tokenizer = ensure_tokenizer(cfg, is_main)
    cache_dir = tokenizer.path.parent if tokenizer.path.is_file() else tokenizer_path(cfg).parent
    streams = {}
    for name, src in sources.items():
        pair = []
        for split in ("train", "val"):
            if is_main:  # rank 0 fills the cache; the others read it after the barrier
                tokens = tokenize_stream(open_source(src, split, cfg.utf8_errors), tokenizer, cache_dir)
            barrier()
            if not is_main:
                tokens = tokenize_stream(open_source(src, split, cfg.utf8_errors), tokenizer, cache_dir)
            pair.append(tokens)
        streams[name] = tuple(pair)
    return tokenizer, streams


def build_data(cfg: DataConfig, seed: int, is_main: bool) -> TrainData:
    tokenizer, streams = _token_streams(cfg, is_main)
    names = list(streams)
    train, val = {}, {}
    for name, (train_tokens, val_tokens) in streams.items():
        train[name], val[name] = PackedSequences(train_tokens, cfg.seq_len), PackedSequences(val_tokens, cfg.seq_len)
        for split, d in (("train", train[name]), ("val", val[name])):
            if len(d) == 0:
                raise StableTrainError(
                    f"the {split} split of {name} has fewer than data.seq_len+1={cfg.seq_len + 1} "
                    f"tokens ({len(d.tokens)})"
                )
    if len(names) == 1:
        (name,) = names
        return TrainData(
            tokenizer, train[name], val[name], GlobalOrder(len(train[name]), seed), names, cfg.seq_len, cfg.doc_mask
        )
    weights = [cfg.source_configs()[n].weight for n in names]
    order = MixtureOrder([len(train[n]) for n in names], weights, seed)
    # Validation: a fixed interleaving of the sources by weight, the same for every run (seed 0, in source order).
    val_order = MixtureOrder([len(val[n]) for n in names], weights, seed=0, shuffle=False)
    val_data = OrderedView(ConcatSequences([val[n] for n in names]), val_order)
    return TrainData(
        tokenizer, ConcatSequences([train[n] for n in names]), val_data, order, names, cfg.seq_len, cfg.doc_mask
    )
