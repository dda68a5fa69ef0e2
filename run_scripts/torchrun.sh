#!/usr/bin/env bash
# Prune on one machine with several processes: FSDP2 shards the frozen weights, every process
# holds the (tiny) masks, and the global batch (prune.batch_size) is split across processes, so the
# run gives the masks a single process would. See edgeprune/distributed.py and docs/scale.md.
# The config and the run directory are checked first, in one process (`edgeprune prune --check`):
# a bad config or an existing run directory is one line and exit status 2, not a torchrun traceback.
#
#   run_scripts/torchrun.sh CONFIG [edgeprune prune options...]
#   NPROC=4 run_scripts/torchrun.sh configs/gpt2_ioi.yaml --set prune.activation_checkpointing=true
#   DEVICE=cpu NPROC=2 run_scripts/torchrun.sh configs/stories_names.yaml --steps 20
#
# Knobs (environment):
#   NPROC    processes on this machine; default: the number of visible GPUs, else 2 (CPU, gloo).
#            With GPUs, one process per GPU (cuda:LOCAL_RANK); nccl is used on GPU, gloo on CPU.
#   DEVICE   model.device for every process: auto (GPU if any) | cpu | cuda.
#   THREADS  CPU threads per process (OMP_NUM_THREADS); torchrun's default is 1. On a CPU-only
#            machine use about cores / NPROC.
#   PORT     rendezvous port when several jobs share a machine (default: a free one, --standalone).
# Memory knobs live in the config (or --set): model.dtype=bfloat16 halves the weights and writer
# states; prune.activation_checkpointing=true recomputes each layer in the backward;
# prune.cache_corrupted=true trades memory for the reference pass of later epochs.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [edgeprune prune options...]" >&2
    exit 2
fi
config=$1
shift

if [[ -z "${NPROC:-}" ]]; then
    gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [[ "${DEVICE:-auto}" != cpu && "$gpus" -gt 0 ]]; then NPROC=$gpus; else NPROC=2; fi
fi
export OMP_NUM_THREADS=${THREADS:-${OMP_NUM_THREADS:-1}}

rendezvous=(--standalone)
if [[ -n "${PORT:-}" ]]; then
    rendezvous=(--master_addr 127.0.0.1 --master_port "$PORT")
fi

python -m edgeprune prune "$config" --set "model.device=${DEVICE:-auto}" "$@" --check >/dev/null || exit 2

status=0
torchrun "${rendezvous[@]}" --nproc_per_node "$NPROC" -m edgeprune prune "$config" \
    --set "model.device=${DEVICE:-auto}" "$@" || status=$?
if [[ $status -ne 0 ]]; then
    echo "$0: the run failed (exit $status); rank 0's one-line error is above torchrun's report" >&2
    exit 2
fi
