"""Train a sentencepiece tokenizer on files, or on a sample of any configured source.

python -m stabletrain.cli.tokenizer --input data/shakespeare/train.jsonl --out tok/sp4096.model --vocab-size 4096
python -m stabletrain.cli.tokenizer data=c4 data.tokenizer.train_docs=100000   # samples the stream
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stabletrain import StableTrainError
from stabletrain.cli import compose_config
from stabletrain.config import validate_data
from stabletrain.data.build import ensure_tokenizer
from stabletrain.data.tokenizer import load_tokenizer, train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=local data.path='corpus/*.jsonl'")
    parser.add_argument("--input", nargs="+", help="jsonl, parquet or text files (instead of a configured source)")
    parser.add_argument("--out", help="path of the .model file to write (default: data.tokenizer.path)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    try:
        if args.input:
            if not args.out:
                parser.error("--input needs --out")
            path = train_tokenizer(args.input, args.out, args.vocab_size, args.model_type, args.text_field)
        else:
            cfg = compose_config(args.overrides).data
            validate_data(cfg)
            if args.out:
                cfg.tokenizer.path = args.out
            if cfg.tokenizer.path and Path(cfg.tokenizer.path).exists():
                raise StableTrainError(f"{cfg.tokenizer.path} exists; remove it or pass --out to train a new one")
            path = ensure_tokenizer(cfg).path
    except StableTrainError as e:
        raise SystemExit(f"stabletrain: error: {e}") from None
    tok = load_tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id})")


if __name__ == "__main__":
    main()
