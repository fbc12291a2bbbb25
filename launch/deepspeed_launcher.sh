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
# A hostfile naming only this machine: no ssh (DeepSpeed would insist on passwordless ssh to localhost).
hosts=$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1}' | sort -u)
if [[ $(echo "$hosts" | wc -l) == 1 && $hosts =~ ^(localhost|127\.0\.0\.1|$(hostname))$ ]]; then
  slots=$(grep -o 'slots=[0-9]*' "$hostfile" | head -n 1 | cut -d= -f2)
  exec deepspeed --num_nodes 1 --num_gpus "${slots:-1}" --no_local_rank train.py "$@"
fi
exec deepspeed --hostfile "$hostfile" --no_local_rank train.py "$@"
