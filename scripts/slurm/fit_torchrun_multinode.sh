#!/bin/bash
# Example: one clusterlight fit with DDP on several nodes, launched by torchrun.
#
# An example, not tested by clusterlight's CI on several nodes (tests/test_torchrun.py runs the
# single-node form on 2 CPU processes). Run this script once on every node, with the same
# MASTER_ADDR (a host name of one of the nodes, reachable from all of them); torchrun's c10d
# rendezvous assigns the node ranks. torchrun starts NPROC_PER_NODE processes per node and
# Lightning detects the torchelastic environment (it takes precedence over SLURM, so this also
# works inside an sbatch job with one srun task per node) and spawns no processes of its own.
#
#     NNODES=2 NPROC_PER_NODE=4 MASTER_ADDR=node001 bash scripts/slurm/fit_torchrun_multinode.sh \
#         --config configs/debiased/usps.yaml
#
# Under SLURM, e.g. in an sbatch script with --nodes=2 --ntasks-per-node=1 --gpus-per-node=4:
#
#     export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#     srun bash scripts/slurm/fit_torchrun_multinode.sh --config configs/debiased/usps.yaml
#
# --trainer.num_nodes and --trainer.devices must match --nnodes and --nproc_per_node.

set -euo pipefail

NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the nodes}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATOR=${ACCELERATOR:-gpu}

exec torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-clusterlight}}" \
    -m clusterlight fit "$@" \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$NPROC_PER_NODE" \
    --trainer.strategy ddp
