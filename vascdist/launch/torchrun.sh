#!/usr/bin/env bash
# Multi-node `vascdist train` with torchrun, no SLURM needed: run it once on every node. It ships inside the
# package; `vascdist script torchrun.sh --path` says where:
#
#   node 0:  bash "$(vascdist script torchrun.sh --path)" --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500 \
#                --nproc-per-node 4 resnet50 optim.lr=0.1 --resume auto --run-dir runs/big
#   node 1:  the same with --node-rank 1
#
# The options below must come first; everything after them (config, overrides, --resume, --run-dir, --quiet)
# goes to `vascdist train` unchanged ("--" ends the options explicitly). Defaults: --nnodes 1,
# --node-rank $SLURM_NODEID or 0, --nproc-per-node 1, --rdzv-id $SLURM_JOB_ID or "vascdist",
# --max-restarts 0, --rdzv-endpoint 127.0.0.1:29500 on one node (required with several).
# Environment: VASCDIST_PYTHON (default: python3) is the interpreter that runs torchrun.
set -euo pipefail

die() { echo "torchrun.sh: $*" >&2; exit 2; }

nnodes=1
node_rank="${SLURM_NODEID:-0}"
nproc=1
endpoint=""
rdzv_id="${SLURM_JOB_ID:-vascdist}"
max_restarts=0

while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes|--node-rank|--nproc-per-node|--rdzv-endpoint|--rdzv-id|--max-restarts)
            [ $# -ge 2 ] || die "$1 needs a value"
            opt="$1" value="$2"; shift 2 ;;
        --nnodes=*|--node-rank=*|--nproc-per-node=*|--rdzv-endpoint=*|--rdzv-id=*|--max-restarts=*)
            opt="${1%%=*}" value="${1#*=}"; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
    case "$opt" in
        --nnodes) nnodes="$value" ;;
        --node-rank) node_rank="$value" ;;
        --nproc-per-node) nproc="$value" ;;
        --rdzv-endpoint) endpoint="$value" ;;
        --rdzv-id) rdzv_id="$value" ;;
        --max-restarts) max_restarts="$value" ;;
    esac
done

if [ -z "$endpoint" ]; then
    [ "$nnodes" = 1 ] || die "--rdzv-endpoint HOST:PORT (a port on the first node) is required with --nnodes $nnodes"
    endpoint="127.0.0.1:29500"
fi

# USR2 asks for checkpoint-and-requeue (SLURM's --signal, scancel --signal). The torchrun agent has no handler
# for it, and USR2's default action would kill the agent; SLURM would then kill the workers while they write
# their checkpoint. An ignored signal stays ignored across exec, so the agent ignores it, and every worker
# installs its own handler (vascdist.preemption.StopSignals) as it starts training.
trap '' USR2

exec "${VASCDIST_PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id" --max-restarts "$max_restarts" \
    -m vascdist.cli train "$@"
