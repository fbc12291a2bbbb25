"""Checkpoint digests: seconds per GB of sha256, blake2b and xxh3-128 against a plain read, on one file.

python bench/hash_speed.py --size-gb 1            # writes a temporary file of random bytes first
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import xxhash

CHUNK = 8 << 20


def seconds(path: str, make) -> float:
    h = make() if make else None
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            if h is not None:
                h.update(block)
    if h is not None:
        h.hexdigest()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(delete=False) as f:
        for _ in range(int(args.size_gb * 1024**3) // CHUNK):
            f.write(os.urandom(CHUNK))
        path = f.name
    try:
        seconds(path, None)  # page cache warm: every row then measures hashing, not the disk
        gb = os.path.getsize(path) / 1e9
        rows = {
            name: min(seconds(path, make) for _ in range(args.repeats)) / gb
            for name, make in (
                ("read only", None),
                ("sha256", hashlib.sha256),
                ("blake2b", hashlib.blake2b),
                ("xxh3_128", xxhash.xxh3_128),
            )
        }
    finally:
        os.unlink(path)
    for name, s in rows.items():
        print(f"{name:10s} {s:.3f} s/GB")
    print(json.dumps({k: round(v, 3) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
