#!/usr/bin/env bash
# The GPU checks of the speed work, as one script for a lent H100/H200, under 9 minutes in all (every part has
# its own time limit, so one device command of at most 10 minutes always returns):
#
#   bash tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: ./gpu_check
#
# Runs from a checkout without installing (PYTHONPATH), writes each part's output to OUT_DIR and continues
# past a failing part, so one broken piece still leaves the others' numbers:
#   1. the CUDA-only tests: FlexAttention kernel vs segmented (forward + gradients, both layouts, no
#      recompile for a new batch of the same length), the fused-loss kernels on the device, one host sync per
#      step, auto's choice of backend;
#   2. the loss alone at 7B and 1.5B shapes, 16k tokens: naive vs triton (gradients in forward) vs
#      triton_recompute, then triton's chunk sizes;
#   3. tools/bench_mfu.py: the real trainer, both layouts, Qwen2-1.5B and 0.5B, against the seed approach
#      (6 timed steps per side here to fit the budget; run it alone for the default 10).
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}

part() {  # part NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err"
    echo "$name rc=$? ${SECONDS}s total, $((SECONDS - started))s here" | tee -a "$out/summary.txt" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/device.txt" 2>&1
$python -c "import torch, triton; print(torch.__version__, triton.__version__)" >>"$out/device.txt" 2>&1
part tests 150 $python -m pytest -q -rs tests/test_flex_attention.py tests/test_attention_backends.py \
    tests/test_step_pipeline.py tests/test_pair_loss_kernel.py
part loss_7b 60 $python tools/bench_loss.py --device cuda --shape qwen2-7b --tokens 16384
part loss_1.5b 45 $python tools/bench_loss.py --device cuda --shape qwen2-1.5b --tokens 16384
part bench_mfu 280 $python tools/bench_mfu.py --presets qwen2-1.5b,qwen2-0.5b --steps 6 --side-timeout 60
cat "$out/summary.txt"
