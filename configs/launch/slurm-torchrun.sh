#!/bin/bash
# vipo on N nodes x 8 GPUs under SLURM: one torchrun per node, rendezvous on the first node.
#
#   sbatch --nodes=4 configs/launch/slurm-torchrun.sh configs/train/my-recipe.yaml parallel.strategy=fsdp
#
# Every argument is passed to `vipo train` (a recipe, then dotted overrides). Checkpoints of
# fsdp / zero runs are written by every rank into train.output_dir: put it on a file system all
# nodes share. Resubmitting with --resume continues from the latest complete checkpoint.
# --signal: SIGTERM 3 minutes before the time limit; srun hands it to torchrun, which forwards it
# to every worker, and the run saves a checkpoint at the next step boundary and exits 143 (torchrun
# gives workers 30 s after forwarding: keep steps plus one save under that, or raise the lead).
#SBATCH --job-name=vipo
#SBATCH --signal=TERM@180
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=%x-%j.out

set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))
# InfiniBand / NCCL knobs belong to the cluster, e.g.: export NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:29500" \
    -m vipo.engine train "$@"
