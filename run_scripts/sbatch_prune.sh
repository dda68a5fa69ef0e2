#!/usr/bin/env bash
# Slurm template: prune across several nodes with torchrun's rendezvous (c10d), one task per node,
# one process per GPU. FSDP2 shards the frozen weights over all processes; the masks are
# replicated; prune.batch_size is the global batch, split across processes.
#
#   sbatch run_scripts/sbatch_prune.sh configs/codellama13b_boolean_instruct.yaml --set model.dtype=bfloat16
#
# Knobs: the #SBATCH lines (nodes, GPUs per node, time, partition), GPUS_PER_NODE below, and the
# config (model.dtype=bfloat16, prune.activation_checkpointing=true for large models).
# run.output_dir must be on a filesystem every node sees: rank 0 writes it, every rank reads the
# checkpoint to resume (re-submit the same command with --resume after a preemption).
#SBATCH --job-name=edgeprune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 CONFIG [edgeprune prune options...]" >&2
    exit 2
fi
config=$1
shift

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p logs

# one torchrun per node; they meet at the head node (c10d rendezvous) and start
# SLURM_NNODES x GPUS_PER_NODE processes in all
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head_node:${MASTER_PORT:-29500}" \
    --rdzv_id "$SLURM_JOB_ID" \
    -m edgeprune prune "$config" --set model.device=cuda "$@"
