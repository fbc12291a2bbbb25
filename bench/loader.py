"""Data-pipeline throughput: `prepare` against sentencepiece called directly, and the loader against training.

    .venv/bin/python bench/loader.py --out bench/results/loader.json

1. Pre-tokenization of the bundled training corpus written as --copies jsonl files (4.7 MB and 39 plays each):
   sentencepiece's encode called in a plain loop over the same texts (one thread), then `prepare` with 1 and 2
   worker processes (one sentencepiece thread each, one input file at a time). Reported: tokens/s total (tokens /
   wall time, worker start-up included) and per worker (tokens / the worker's own time reading, tokenizing and
   writing).
2. Loader: RankLoader.next_batch() (micro-batch 8 x seq 256, one rank) over the on-the-fly token array, the
   memory-mapped pretokenized shards, a 3-source mixture, and the shards with document ids (data.doc_mask),
   compared with what training consumes per second (docs/BENCHMARKS.md: 3,995 tokens/s for the default tiny model,
   778 tokens/s at d=512, same batch shape).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


from stabletrain.cli import compose_config  # noqa: E402
from stabletrain.data.build import build_data, ensure_tokenizer  # noqa: E402
from stabletrain.data.loader import RankLoader  # noqa: E402
from stabletrain.data.prepare import prepare  # noqa: E402
from stabletrain.data.sources import iter_texts  # noqa: E402


def compose_data(overrides: list[str]):
    return compose_config(overrides).data


TRAINING_TOKENS_PER_S = {"tiny (d=256, 4 layers)": 3995, "d=512, 8 layers": 778}  # docs/BENCHMARKS.md
TRAIN = REPO / "data/shakespeare/train.jsonl"


def sentencepiece_loop(texts: list[str], model: str, repeats: int) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = sum(len(sp.encode(t, num_threads=1)) + 1 for t in texts)  # +1: the EOS prepare appends
        rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens": tokens, "tokens_per_s": statistics.median(rates), "all": rates}


def prepare_runs(workers: int, repeats: int, shard_docs: int, corpus: Path, tokenizer: Path) -> dict:
    cfg = compose_data(
        [
            "data=local",
            f"data.path={corpus}/*.jsonl",
            f"data.tokenizer.path={tokenizer}",
            f"data.source.val_files=[{REPO / 'data/shakespeare/val.jsonl'}]",
            "data.source.val_docs=0",
            f"data.prepare.shard_docs={shard_docs}",
        ]
    )
    totals, per_worker, manifests = [], [], []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
        try:
            result = prepare(cfg, out, workers=workers, progress=False)
            totals.append(result["stats"]["tokens_per_s"])
            per_worker += result["stats"]["per_worker_tokens_per_s"]
            manifests.append(result["manifest"]["sources"]["local"]["splits"]["train"]["tokens"])
        finally:
            shutil.rmtree(out)
    return {
        "workers": workers,
        "tokens_per_s_total": statistics.median(totals),
        "all_total": totals,
        "tokens_per_s_per_worker": statistics.median(per_worker),
        "all_per_worker": per_worker,
        "train_tokens": manifests[0],
    }


def loader_rate(data, steps: int, doc_ids: bool = False) -> float:
    loader = RankLoader(data.train, data.order, micro_batch_size=8, accum=1, rank=0, world_size=1)
    loader.next_batch()  # warm the permutation cache
    t0 = time.perf_counter()
    for _ in range(steps):
        (batch,) = loader.next_batch()
        if doc_ids:
            data.model_kwargs(batch)
    return steps * 8 * (data.seq_len + 1) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--shard-docs", type=int, default=4)
    parser.add_argument("--copies", type=int, default=8, help="input files, each a copy of the training corpus")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    bundled = ensure_tokenizer(compose_data([]))
    tok_dir = Path(tempfile.mkdtemp(prefix="bench-tok-"))  # token caches of the temporary files land here
    shutil.copy(bundled.path, tok_dir / bundled.path.name)
    tok = type(bundled)(tok_dir / bundled.path.name)
    corpus = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    for i in range(args.copies):
        shutil.copy(TRAIN, corpus / f"part{i:02d}.jsonl")
    texts = list(iter_texts(sorted(str(p) for p in corpus.glob("*.jsonl"))))
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "corpus_bytes": sum(len(t.encode()) for t in texts),
        "copies": args.copies,
    }
    results["sentencepiece_loop"] = sp = sentencepiece_loop(texts, str(tok.path), args.repeats)
    print(f"sentencepiece loop (1 thread): {sp['tokens_per_s']:,.0f} tokens/s ({sp['tokens']:,} tokens)")
    results["prepare"] = []
    for workers in (1, 2):
        r = prepare_runs(workers, args.repeats, args.shard_docs, corpus, tok.path)
        results["prepare"].append(r)
        print(
            f"prepare, {workers} worker(s): {r['tokens_per_s_total']:,.0f} tokens/s total, "
            f"{r['tokens_per_s_per_worker']:,.0f} tokens/s per worker "
            f"({r['tokens_per_s_per_worker'] / sp['tokens_per_s']:.2f} of the bare loop)"
        )

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        prepare(compose_data([f"data.prepare.shard_docs={args.shard_docs}"]), tmp, workers=1, progress=False)
        mixture_dir = Path(tmp) / "mixture-src"
        mixture_dir.mkdir()
        lines = TRAIN.read_text().splitlines(keepends=True)
        for i in range(3):
            (mixture_dir / f"part{i}.jsonl").write_text("".join(lines[i::3]))
        mixture = ["data=local", "data.name=mix", "data.seq_len=256", f"data.tokenizer.path={tok.path}"] + [
            f"+data.sources.part{i}={{train_files: ['{mixture_dir}/part{i}.jsonl'], val_docs: 1, weight: {w}}}"
            for i, w in enumerate((0.5, 0.3, 0.2))
        ]
        variants = {
            "on-the-fly array": (build_data(compose_data(["data.seq_len=256"]), 0, True), False),
            "pretokenized shards (memmap)": (
                build_data(compose_data(["data.seq_len=256", "data.format=pretokenized", f"data.path={tmp}"]), 0, True),
                False,
            ),
            "pretokenized + doc ids": (
                build_data(
                    compose_data(
                        ["data.seq_len=256", "data.format=pretokenized", f"data.path={tmp}", "data.doc_mask=true"]
                    ),
                    0,
                    True,
                ),
                True,
            ),
            "3-source mixture": (build_data(compose_data(mixture), 0, True), False),
        }
        results["loader"] = {}
        for name, (data, ids) in variants.items():
            rate = statistics.median(loader_rate(data, args.loader_steps, ids) for _ in range(args.repeats))
            results["loader"][name] = rate
            ratios = ", ".join(f"{rate / v:,.0f}x {k}" for k, v in TRAINING_TOKENS_PER_S.items())
            print(f"loader, {name}: {rate:,.0f} tokens/s ({ratios} training)")
    shutil.rmtree(corpus)
    shutil.rmtree(tok_dir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
