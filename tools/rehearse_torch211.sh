#!/usr/bin/env bash
# Rehearse the GPU path's CPU-runnable parts under the lent GPUs' versions -- torch 2.11.0 (+cu130), triton
# 3.6.0, numpy 2.5 -- in a throwaway virtualenv, before spending device time (not run in CI: it downloads
# ~2.4 GB).
#
#   bash tools/rehearse_torch211.sh [LOG_DIR]      # default LOG_DIR: a temp dir; the venv is removed at the end
#
#   REHEARSE_PYTHON   the interpreter (default: python3.12 on PATH, else pyenv's 3.12.*, else python3;
#                     the device runs Python 3.12, and numpy 2.5 ships wheels for >= 3.12 only)
#   REHEARSE_WHEELS   a wheel cache kept between runs (default ~/.cache/megapmp-rehearse-wheels)
#   KEEP=1            keep the virtualenv (its path is printed)
#
# PyPI's torch 2.11.0 for Linux x86_64 is the CUDA build. The cheapest install that imports on a CPU: the
# torch, triton and numpy wheels with --no-deps, the pure-Python requirements torch declares, and of its
# ~3 GB of NVIDIA packages only those whose libraries its .so files link at load time (readelf NEEDED:
# cudart, nvrtc, cupti, cublas, cudnn, cufft, cufile, curand, cusparse, cusparseLt, nccl, nvjitlink, nvshmem);
# cusolver, nvtx, cuda-bindings and the cuda-toolkit metapackage are left out. Then, from the checkout with
# PYTHONPATH (as on the device, no install), each step under a time limit, its result in LOG_DIR:
#   kernels      tests/test_pair_loss_kernel.py: the loss kernels under triton 3.6's interpreter (numpy 2.5),
#                softmax_grad.compile_for_gpu(90) (the row kernels compiled for sm_90 without a GPU)
#   flex         tests/test_flex_attention.py: FlexAttention's CPU forward and mask rule (torch 2.11)
#   compile      tests/test_step_pipeline.py: regional compile with inductor on the CPU, dynamo's graph count
#                over 20 steps of varied pairs, the compiled trainer against the eager one
#   backends     tests/test_attention_backends.py
#   sm90_report  bench_loss.py --compile-report: every triton_recompute tile config compiled for sm_90
#   bench_mfu    bench_mfu.py --device cpu (JSON lines per side)
#   bench_loss   bench_loss.py --device cpu --shape small
#   gpu_check    gpu_check.sh --dry-run (the device command's plumbing under torch 2.11)
# and a summary table last.
set -u
cd "$(dirname "$0")/.."
repo=$PWD
logs=${1:-$(mktemp -d /tmp/rehearse_torch211.XXXXXX)}
mkdir -p "$logs" || exit 2
wheels=${REHEARSE_WHEELS:-$HOME/.cache/megapmp-rehearse-wheels}
mkdir -p "$wheels" || exit 2

python=${REHEARSE_PYTHON:-}
if [ -z "$python" ]; then  # the first that runs (a pyenv shim can exist and refuse to)
    for candidate in python3.12 $(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python3 2>/dev/null) python3; do
        if "$candidate" -c 'import sys' >/dev/null 2>&1; then python=$candidate; break; fi
    done
fi
numpy_pin='numpy>=2.5,<2.6'
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    numpy_pin='numpy>=2.4,<2.5'  # numpy 2.5 has no wheels below Python 3.12: the nearest that breaks the same way
    echo "note: $("$python" --version) < 3.12: numpy 2.4 instead of the device's 2.5" >&2
fi
venv=$(mktemp -d /tmp/rehearse_venv.XXXXXX)/venv
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "virtualenv kept: $venv" >&2; else rm -rf "$(dirname "$venv")"; fi; }
trap cleanup EXIT

"$python" -m venv "$venv" || exit 1
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
# torch 2.11.0's own pins (its METADATA, resolved through cuda-toolkit 13.0.2), load-time libraries only
cuda_libs=(nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cupti==13.0.85 nvidia-cublas==13.1.0.3
           nvidia-cudnn-cu13==9.19.0.56 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35
           nvidia-cusparse==12.6.3.3 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9
           nvidia-nvjitlink==13.0.88 nvidia-nvshmem-cu13==3.4.5)
echo "downloading into $wheels (cached between runs) ..." >&2
"${pip[@]}" download --no-deps --only-binary=:all: -d "$wheels" torch==2.11.0 triton==3.6.0 "$numpy_pin" \
    "${cuda_libs[@]}" || exit 1
"${pip[@]}" install --no-deps --no-index --find-links "$wheels" torch==2.11.0 triton==3.6.0 "$numpy_pin" \
    "${cuda_libs[@]}" || exit 1
"${pip[@]}" install filelock 'typing-extensions>=4.10' 'setuptools<82' 'sympy>=1.13.3' 'networkx>=2.5.1' jinja2 \
    'fsspec>=0.8.5' tqdm safetensors tokenizers pytest hypothesis 'transformers==5.17.0' || exit 1

export PYTHONPATH="$repo:$repo/kernels" PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
unset TRITON_INTERPRET
py="$venv/bin/python"
"$py" -c "import torch, triton, numpy, transformers; print('versions: torch', torch.__version__, 'triton',
triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$logs/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    local tail_line
    tail_line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s" "$logs/$name.log" | tail -1)
    printf '%-12s rc=%-4s %4ss  %s\n' "$name" "$rc" "$((SECONDS - started))" "$tail_line" | tee -a "$logs/summary.txt"
}

pytest=("$py" -m pytest -p no:cacheprovider -q -rs)
step kernels 900 "${pytest[@]}" tests/test_pair_loss_kernel.py
step flex 900 "${pytest[@]}" tests/test_flex_attention.py
step compile 1200 "${pytest[@]}" tests/test_step_pipeline.py
step backends 600 "${pytest[@]}" tests/test_attention_backends.py
step sm90_report 600 "$py" tools/bench_loss.py --compile-report
step bench_mfu 600 "$py" tools/bench_mfu.py --device cpu
step bench_loss 600 "$py" tools/bench_loss.py --device cpu --shape small --tokens 512 --reps 2
step gpu_check 600 env PYTHON="$py" bash tools/gpu_check.sh "$logs/gpu_check" --dry-run
"$py" - "$logs" <<'EOF' | tee -a "$logs/summary.txt"
import json, sys
from pathlib import Path
logs = Path(sys.argv[1])
report = json.loads((logs / "sm90_report.log").read_text().strip().splitlines()[-1])
rows = report["compile_report"]
print(f"sm90_report: {len(rows)} configs, ok={report['ok']}, errors={sum('error' in r for r in rows)}, "
      f"with HGMMA {sum(r.get('hgmma', 0) > 0 for r in rows)}, spilling {sum(r.get('stl', 0) > 0 for r in rows)}")
for name in ("bench_mfu", "bench_loss"):
    lines = [json.loads(l) for l in (logs / f"{name}.log").read_text().splitlines() if l.startswith("{")]
    sides = [l["side"] for l in lines if l.get("line") == "side"]
    print(f"{name}: {len(sides)} side lines {sides}, summary line {'yes' if lines and lines[-1].get('line') == 'summary' else 'no'}")
EOF
echo "logs: $logs" >&2
