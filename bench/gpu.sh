#!/usr/bin/env bash
# Every GPU measurement in one call of at most 8 minutes on one GPU (a lent machine's time is short): each part of
# bench/gpu.py in its own process under its own time limit, fastest builds first, slow compiles last; every part
# rewrites its JSON after each timed block, so a part stopped by its limit still leaves numbers. Results in $OUT (or
# bench/results/gpu): <part>.json, <part>.log, device.txt, pytest.log.
#
#   bash bench/gpu.sh             # on a machine with a CUDA GPU
#   bash bench/gpu.sh --tiny      # the same script on a CPU with tiny models (the test suite runs it)
#
# PYTHON: the interpreter (default .venv/bin/python); docs/BENCHMARKS.md shows how to run it on a machine that has
# CUDA torch but not the project's other packages.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
tiny=()
# Seconds per part: loop, stream, pytest, fp8 (480 in all). The tiny dry run gets the same shape, shorter.
caps=(70 190 60 160)
if [ "${1:-}" = "--tiny" ]; then
  tiny=(--tiny)
  caps=(120 240 120 180)
  export TRITON_INTERPRET=1  # kernel=triton on CPU tensors
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
fi
"$py" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" >> "$out/device.txt"

run() {  # name, seconds, command...
  local name=$1 cap=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - t0)) s (limit $cap s)" | tee -a "$out/parts.txt"
}

run loop "${caps[0]}" "$py" bench/gpu.py loop --out "$out" "${tiny[@]}"
run stream "${caps[1]}" "$py" bench/gpu.py stream --out "$out" "${tiny[@]}"
run pytest "${caps[2]}" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
run fp8 "${caps[3]}" "$py" bench/gpu.py fp8 --out "$out" "${tiny[@]}"
exit 0
