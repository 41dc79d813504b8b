#!/usr/bin/env bash
# launch.sh: one node's share of a (multi-node) run: torchrun of train.py, always with --resume true, so the same
# command starts a fresh run or continues from the newest complete checkpoint in RUN_DIR (a requeued job).
# slurm.sbatch runs it once per node through srun; it runs without SLURM too (tests/test_launch.py):
#
#   RUN_DIR=/scratch/runs/kk NNODES=2 NODE_RANK=0 RDZV_HOST=node0 bash scripts/launch.sh --config configs/X.toml
#   RUN_DIR=/scratch/runs/kk NNODES=2 NODE_RANK=1 RDZV_HOST=node0 bash scripts/launch.sh --config configs/X.toml
#
# Environment (every one has a default under SLURM):
#   RUN_DIR         checkpoints and metrics, on a filesystem every node sees (required)
#   NNODES          nodes in the run                    default $SLURM_NNODES, else 1
#   NODE_RANK       this node, 0..NNODES-1              default $SLURM_NODEID, else 0 (node 0 hosts the rendezvous)
#   NPROC_PER_NODE  ranks (GPUs) on this node           default $SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 1
#   RDZV_HOST       the rendezvous host (node 0)        default the job's first host, else localhost
#   RDZV_PORT       its port                            default 29500
#   PYTHON          run `$PYTHON -m torch.distributed.run` (e.g. a venv's python) instead of `torchrun`
# Arguments are passed on to train.py after --resume true --run_dir "$RUN_DIR" (later flags win).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # the repository: train.py's directory
: "${RUN_DIR:?set RUN_DIR to a directory on a filesystem every node sees}"

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-}"
    if [ -z "$NPROC_PER_NODE" ] && command -v nvidia-smi > /dev/null; then
        NPROC_PER_NODE="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
    fi
    if [ -z "$NPROC_PER_NODE" ] || [ "$NPROC_PER_NODE" -lt 1 ]; then
        NPROC_PER_NODE=1
    fi
fi
if [ -z "${RDZV_HOST:-}" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        RDZV_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    else
        RDZV_HOST=localhost
    fi
fi
RDZV_PORT="${RDZV_PORT:-29500}"
# Node 0 hosts the c10d store: said explicitly, since torchrun's own guess (does RDZV_HOST name this machine?)
# fails where the scheduler's host names differ from the machines' own, and is ambiguous for localhost.
IS_HOST=0
if [ "$NODE_RANK" = 0 ]; then
    IS_HOST=1
fi

# On SIGTERM torchrun passes it to the ranks, then kills them after this many seconds (torch's default, 30, is
# shorter than a step plus a checkpoint): below the lead time of slurm.sbatch's --signal (300 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}"

if [ -n "${PYTHON:-}" ]; then
    LAUNCHER=("$PYTHON" -m torch.distributed.run)
else
    LAUNCHER=(torchrun)
fi
CMD=("${LAUNCHER[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "${SLURM_JOB_ID:-rlad}"
     --rdzv_conf "is_host=$IS_HOST"
     "$ROOT/train.py" --resume true --run_dir "$RUN_DIR" "$@")
echo "launch.sh: node $NODE_RANK of $NNODES on $(hostname): ${CMD[*]}" >&2
exec "${CMD[@]}"  # exec: a signal to this task reaches torchrun, which passes SIGTERM on to train.py
