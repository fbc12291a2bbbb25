#!/usr/bin/env bash
# Every GPU check in one call (a lent GPU machine's time is short): bf16 throughput against the bare loop, the
# residual-stream overhead at 1B in bf16, and MFU. Results land in $OUT (or bench/results/gpu) as JSON + log.
#   bash bench/gpu.sh            # on a machine with a CUDA GPU, after `make setup` (installs the CUDA torch there)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
common=(trainer.device=cuda precision=bf16 data.seq_len=2048 trainer.micro_batch_size=4)
# Framework vs bare loop (the bare loop is fp32 AdamW over bf16 autocast-free weights: compare ratios, not MFU).
$py bench/throughput.py --steps 10 --repeats 3 "${common[@]}" model.d_model=2048 model.n_heads=16 model.n_layers=16 \
  --out "$out/throughput_1b.json" 2>&1 | tee "$out/throughput_1b.log"
# Residual overhead at the LayerNorm-Scaling paper's 1B shape (24 layers, d=2048), n = 4 streams.
$py bench/residual_overhead.py --steps 5 --repeats 3 "${common[@]}" model.d_model=2048 model.n_heads=32 \
  model.n_layers=24 model.ffn.hidden=5461 --out "$out/residual_overhead_1b.json" 2>&1 | tee "$out/residual_overhead_1b.log"
# FP8 against bf16 at ~1B (the goal: fp8 >= 1.3x bf16 tokens/s); torchao's kernels are the fast path on a GPU.
$py bench/fp8.py --steps 10 --repeats 3 --variants bf16,scaled_mm,torchao_rowwise,torchao_tensorwise \
  trainer.device=cuda model.d_model=2048 model.n_heads=16 model.n_layers=16 data.seq_len=2048 trainer.micro_batch_size=4 \
  --out "$out/fp8_1b.json" 2>&1 | tee "$out/fp8_1b.log"
