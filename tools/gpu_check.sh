#!/usr/bin/env bash
# The device check of the GPU path: ONE command on a lent H100/H200 that returns numbers.
#
#   bash tools/gpu_check.sh OUT_DIR              # on the device: OUT_DIR = "$OUT"; the device tool's timeout_s 480
#   bash tools/gpu_check.sh OUT_DIR --dry-run    # the same plumbing on a CPU with tiny settings (~1 min; CI runs it)
#
# Runs from a checkout without installing (PYTHONPATH) and writes only into OUT_DIR: at most 8 flat files
# (summary.txt, summary.json, tests.log, loss.jsonl, loss.log, mfu.jsonl, mfu.log), nothing in the checkout
# (no .pytest_cache, no __pycache__). Each part runs under `timeout -k 10 LIMIT`, LIMIT its own but never past a
# total deadline (GPU_CHECK_DEADLINE_S, default 390 s: the whole command ends within 7 minutes, so a second try
# fits the 15-minute device budget; GPU_CHECK_LIMIT_<part> overrides one part's limit, '.' in its name written
# '_'; GPU_CHECK_PARTS="mfu loss_7b" runs only the parts named, e.g. on a second try); a part that fails or is
# killed is recorded and the next one runs. The bench
# tools print one JSON line per side as it finishes, so a killed part keeps every side it measured.
#
#   env        torch / triton / numpy / transformers versions, nvidia-smi (into summary.txt)
#   tests      the CUDA tests only (pytest -m cuda; TRITON_INTERPRET unset: the Triton kernels, compiled
#              FlexAttention and the compiled layers run as GPU kernels): FlexAttention vs segmented, the
#              attention backends, one host sync per step, the loss kernels at GPU launch configurations
#   loss_1.5b  tools/bench_loss.py at Qwen2-1.5B shapes, 16k tokens: naive, triton, triton_recompute (one pinned
#              tile config: no 12-config autotune), and triton with each fp32 accumulation mode of the LM
#              head's gradient (addmm / mm / cast: does the out_dtype GEMM matter?)
#   loss_7b    the same at Qwen2-7B shapes (no accumulation-mode sides)
#   mfu        tools/bench_mfu.py, Qwen2-1.5B: both layouts and the seed approach (the sides whose memory
#              estimate fits the card), 32 pairs per step in 4 micro-batches, 1 warm-up + 4 timed steps + 1
#              profiled (top-10 kernels); medians leave out steps that compiled
#   mfu_extra  only if time is left: the prompt-heavy mix (prompt as long as a response) for the two layouts,
#              then Qwen2-0.5B
# Last, tools/gpu_check_summary.py writes summary.json and prints the headline figures (the device tool's
# output_tail holds them).
set -u
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]}
dry=0
if [ "${2:-}" = "--dry-run" ]; then dry=1; elif [ -n "${2:-}" ]; then echo "unknown option: $2" >&2; exit 2; fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # a CUDA run compiles its Triton kernels for the GPU (tests/triton_interpreter.py)
python=${PYTHON:-python3}
deadline=${GPU_CHECK_DEADLINE_S:-390}
grace=10  # timeout -k: SIGTERM first (the benches report what they measured), SIGKILL this much later
: >"$out/summary.txt"

note() { echo "$*" | tee -a "$out/summary.txt" >&2; }

part() {  # part NAME LIMIT_S STDOUT_FILE STDERR_FILE COMMAND...: run it, append its output, record rc and time
    local name=$1 limit=$2 stdout=$3 stderr=$4
    shift 4
    if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]; then return; fi
    local env_limit="GPU_CHECK_LIMIT_${name//./_}"
    limit=${!env_limit:-$limit}
    local left=$((deadline - SECONDS - grace))
    if [ "$left" -lt 15 ]; then
        note "part $name rc=skipped seconds=0 limit=$left (no time left before the ${deadline}s deadline)"
        return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)" >>"$out/$stderr"
    local started=$SECONDS
    timeout -k "$grace" "$limit" "$@" >>"$out/$stdout" 2>>"$out/$stderr"
    local rc=$?
    note "part $name rc=$rc seconds=$((SECONDS - started)) limit=$limit"
}

time_left() { echo $((deadline - SECONDS - grace)); }

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname) dry_run=$dry deadline=${deadline}s"
if [ "$dry" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$out/summary.txt" >&2
fi
timeout 60 $python -c "
import importlib, torch
mods = {m: getattr(importlib.import_module(m), '__version__', '?') for m in ('triton', 'numpy')}
try:
    import transformers; mods['transformers'] = transformers.__version__
except ImportError:
    mods['transformers'] = None
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print('versions', 'torch', torch.__version__, *(f'{k} {v}' for k, v in mods.items()), 'cuda_device', cuda)
" 2>&1 | tee -a "$out/summary.txt" >&2

cuda_tests=(tests/test_flex_attention.py tests/test_attention_backends.py tests/test_step_pipeline.py
            tests/test_pair_loss_kernel.py)
if [ "$dry" = 1 ]; then
    part tests 120 tests.log tests.log $python -m pytest -p no:cacheprovider -v -rs -m cuda "${cuda_tests[@]}"
    part loss_small 90 loss.jsonl loss.log $python tools/bench_loss.py --device cpu --shape small --tokens 128 \
        --pairs 4 --reps 1 --sides naive,torch
    part mfu 120 mfu.jsonl mfu.log $python tools/bench_mfu.py --device cpu --warmup 1 --steps 1 --no-profile \
        --sides megapmp_duplicated,seed_ckpt
    if [ "$(time_left)" -ge 45 ]; then
        part mfu_extra 60 mfu.jsonl mfu.log $python tools/bench_mfu.py --device cpu --warmup 1 --steps 1 \
            --no-profile --sides megapmp_shared_prefix --prompt-len 20,70 --seq-len 280
    fi
else
    part tests 120 tests.log tests.log $python -m pytest -p no:cacheprovider -v -rs -m cuda --durations=15 \
        "${cuda_tests[@]}"
    loss=(--device cuda --tokens 16384 --reps 10 --sides naive,triton,triton_recompute
          --recompute-config 128,128,64,8,3)
    part loss_1.5b 45 loss.jsonl loss.log $python tools/bench_loss.py --shape qwen2-1.5b "${loss[@]}" \
        --accumulate addmm,mm,cast
    part loss_7b 50 loss.jsonl loss.log $python tools/bench_loss.py --shape qwen2-7b "${loss[@]}"
    mfu=(--pairs-per-step 32 --micro-batches 4 --warmup 1 --steps 4)
    part mfu 160 mfu.jsonl mfu.log $python tools/bench_mfu.py --presets qwen2-1.5b "${mfu[@]}" --side-timeout 75
    if [ "$(time_left)" -ge 60 ]; then  # the prompt-heavy mix: shared-prefix's ceiling is highest there
        part mfu_prompt_heavy 90 mfu.jsonl mfu.log $python tools/bench_mfu.py --presets qwen2-1.5b "${mfu[@]}" \
            --no-profile --sides megapmp_duplicated,megapmp_shared_prefix --prompt-len 200,700 --seq-len 2800 \
            --side-timeout 45
    fi
    if [ "$(time_left)" -ge 60 ]; then
        part mfu_0.5b 90 mfu.jsonl mfu.log $python tools/bench_mfu.py --presets qwen2-0.5b "${mfu[@]}" \
            --no-profile --side-timeout 40
    fi
fi
timeout 60 $python tools/gpu_check_summary.py "$out" 2>&1 | tee -a "$out/summary.txt"
