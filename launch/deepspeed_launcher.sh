#!/usr/bin/env bash
# The DeepSpeed launcher (pdsh over a hostfile) instead of torchrun:
#   bash launch/deepspeed_launcher.sh hostfile model=baseline engine=zero3
# --no_local_rank: the launcher would otherwise append --local_rank=N, which Hydra rejects.
# OMP_NUM_THREADS: the launcher leaves it unset (steps run 2x slower on CPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile=$1; shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export STABLETRAIN_RUN_STAMP="${STABLETRAIN_RUN_STAMP:-$(date +%Y-%m-%d_%H-%M-%S)}"
exec deepspeed --hostfile "$hostfile" --no_local_rank train.py "$@"
