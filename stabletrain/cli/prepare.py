"""Pre-tokenize a source (or a mixture's sources) into shards that `data.format=pretokenized` reads.

    python -m stabletrain.cli.prepare data=c4 out=/scratch/c4-sp32k data.prepare.workers=32
    python -m stabletrain.cli.prepare data=local data.path='corpus/*.jsonl' out=prepared/corpus

The same config tree as train.py (data=, data.path=, data.tokenizer.path= mean the same); the library side is
stabletrain.data.prepare.
"""

from __future__ import annotations

import sys

from stabletrain import StableTrainError
from stabletrain.cli import compose_config
from stabletrain.config import validate_data
from stabletrain.data.prepare import prepare


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    overrides = [a for a in argv if not a.startswith("out=")]
    if len(outs) != 1 or any(a in ("-h", "--help") for a in argv):
        sys.exit(__doc__.split("\n\n")[1] if not outs else "stabletrain: error: give exactly one out=<dir>")
    try:
        cfg = compose_config(overrides).data
        validate_data(cfg)
        result = prepare(cfg, outs[0])
    except StableTrainError as e:
        print(f"stabletrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(f"stabletrain: interrupted; rerun the same command to resume {outs[0]}")
    s, m = result["stats"], result["manifest"]
    for name, source in m["sources"].items():
        for split, info in source["splits"].items():
            print(
                f"{name}/{split}: {info['docs']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} "
                f"shard(s)"
                + (f", {info['invalid_utf8_docs']} with invalid UTF-8 replaced" if info["invalid_utf8_docs"] else "")
            )
    print(
        f"tokenized {s['tokens']:,} tokens in {s['wall_s']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s, "
        f"{s['workers']} worker(s); {s['skipped_shards']} finished shard(s) skipped) -> {outs[0]} ({m['dtype']})"
    )


if __name__ == "__main__":
    main()
