#!/usr/bin/env bash
# Multi-node training with torchrun. Run the same command on every node:
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 host> bash launch/torchrun_multinode.sh model=baseline engine=zero1
# All ranks agree on one run directory by themselves (rank 0 broadcasts its timestamp); pass
# hydra.run.dir=... or set JOB_ID to name it yourself (the directory must be on a shared filesystem).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:=1}" "${NODE_RANK:=0}" "${NPROC_PER_NODE:=8}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [[ -n "${JOB_ID:-}" ]]; then export STABLETRAIN_RUN_STAMP="$JOB_ID"; fi
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" train.py "$@"
