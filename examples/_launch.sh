# Shared by the launch scripts (source it; do not run it). Reads the torchrun topology from the
# environment, derives data parallel and the micro-batch count from the world size, prints the layout
# and the per-rank memory estimate, then starts torchrun on every node with the same arguments.
#
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (localhost)  MASTER_PORT (29500)  GPUS_PER_NODE (8)
#   TP, PP      tensor / pipeline parallel sizes (each script sets its default)
#   MICRO_PAIRS pairs per micro-batch per data-parallel rank (each script sets its default)
#   RUN_DIR     output directory (shared filesystem: every rank writes its checkpoint shard there)
#   EXTRA_ARGS  more --section.key value overrides, appended last
#   DRY_RUN=1   print the layout, the estimate and the torchrun command without starting it
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
PYTHON=${PYTHON:-python}

launch() {  # launch CONFIG PAIRS_PER_STEP ARGS...
    local config=$1 pairs=$2
    shift 2
    if (( WORLD_SIZE % (TP * PP) )); then
        echo "world size $WORLD_SIZE (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP=$TP x PP=$PP" >&2
        exit 2
    fi
    local dp=$((WORLD_SIZE / (TP * PP)))
    if (( pairs % (dp * MICRO_PAIRS) )); then
        echo "$pairs pairs per step do not split into DP=$dp x MICRO_PAIRS=$MICRO_PAIRS" >&2
        exit 2
    fi
    local micro_batches=$((pairs / (dp * MICRO_PAIRS)))
    local args=(--config "$config" --run-dir "$RUN_DIR" --parallel.tp "$TP" --parallel.pp "$PP"
                --data.items_per_step "$pairs" --data.micro_batches "$micro_batches" "$@" ${EXTRA_ARGS:-})
    echo "[launch] node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs each, master $MASTER_ADDR:$MASTER_PORT"
    "$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/../tools/estimate_memory.py" --world-size "$WORLD_SIZE" "${args[@]}"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "[launch] dry run: $PYTHON -m torch.distributed.run --nnodes $NNODES --node-rank $NODE_RANK" \
             "--nproc-per-node $GPUS_PER_NODE --master-addr $MASTER_ADDR --master-port $MASTER_PORT -m megapmp.train ${args[*]}"
        return 0
    fi
    exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
        --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m megapmp.train "${args[@]}"
}
