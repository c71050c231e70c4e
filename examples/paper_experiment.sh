#!/usr/bin/env bash
# With vs without PMP, identical RM finetuning on GSM8K-derived pairs, finetuning sizes growing by sqrt(2)
# (CodePMP Fig. 4) at the scale a 2-core CPU allows. Runs the quickstart first if its output is missing.
#
#   bash examples/paper_experiment.sh [BASE_DIR] [OUT_DIR] [extra tools/paper_experiment.py flags]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE=${1:-runs/quickstart}
OUT=${2:-runs/paper_experiment}
shift $(( $# > 2 ? 2 : $# ))
if [ ! -d "$BASE/runs/pmp/checkpoints" ]; then
  bash examples/quickstart.sh "$BASE"
fi
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" tools/paper_experiment.py --base "$BASE" --output "$OUT" "$@"
