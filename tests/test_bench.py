"""The one-call GPU benchmark (bench/gpu.sh) as a dry run on this CPU with tiny models, so that the script a lent GPU
machine runs cannot rot: every part ends within its limit and leaves its JSON with timed blocks and ratios."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, env

pytestmark = pytest.mark.slow


def test_the_gpu_benchmark_runs_end_to_end_as_a_tiny_cpu_dry_run(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--tiny"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env(), "OUT": str(tmp_path), "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = (tmp_path / "parts.txt").read_text().splitlines()
    assert [p.split(":")[0] for p in parts] == ["loop", "stream", "pytest", "fp8"]
    assert all(": exit 0 " in p for p in parts), parts + [(tmp_path / "stream.log").read_text()[-3000:]]
    for part, variants in {"loop": ["framework", "plain"], "stream": ["baseline/eager", "mhc/eager", "mhc/triton"],
                           "fp8": ["bf16", "fp8/rowwise", "fp8/tensorwise"]}.items():  # fmt: skip
        data = json.loads((tmp_path / f"{part}.json").read_text())
        assert data["errors"] == {} and list(data["variants"]) == variants, data
        assert all(v["tokens_per_s"] > 0 and v["blocks"] for v in data["variants"].values())
        assert data["ratios"]
    assert json.loads((tmp_path / "fp8.json").read_text())["variants"]["fp8/rowwise"]["fp8_coverage"] == 1.0
    assert os.path.getsize(tmp_path / "device.txt") > 0
