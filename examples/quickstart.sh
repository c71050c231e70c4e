#!/usr/bin/env bash
# The main job, end to end on a CPU in minutes (paper Fig. 9 in miniature):
#   Python stdlib code -> rules pairs -> shards -> tiny LM pretraining -> PMP -> RM finetuning on
#   GSM8K-derived pairs -> evaluation (RM accuracy, GSM8K Best-of-4 on real model solutions, LogiQA2.0,
#   CodePrefBench) -> HF export -> the same scores recomputed from the export with transformers alone.
#
#   bash examples/quickstart.sh [OUT_DIR]        (default runs/quickstart)
#
# Installs into .venv first if megapmp is not importable. Real evaluation data is read from
# $MEGAPMP_DATA (default ../shared/data); evaluations whose data is missing are skipped and listed.
# Writes OUT_DIR/report.json, OUT_DIR/report.md, plots and OUT_DIR/hf/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-runs/quickstart}
DATA=${MEGAPMP_DATA:-$ROOT/../shared/data}
mkdir -p "$OUT"/{data,runs,eval,eval_hf}
OUT=$(cd "$OUT" && pwd)

# -- install ---------------------------------------------------------------------------------------
# Imports are checked from / so that the repository itself on sys.path cannot fake an installed package.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] || ! (cd / && python3 -c "import megapmp, torch, transformers") 2>/dev/null; then
  if [ ! -x .venv/bin/python ]; then
    echo "[quickstart] creating .venv and installing (torch==2.13.0 CPU wheel, then megapmp[dev])" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0
  fi
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
(cd / && "$PY" -c "import megapmp, megapmp_kernels.pair_loss, transformers, matplotlib") 2>/dev/null || "$PY" -m pip install -q -e "$ROOT[dev]"
export TOKENIZERS_PARALLELISM=false

echo "{}" > "$OUT/timings.json"
echo "{}" > "$OUT/skipped.json"
record() {  # record KEY JSON_VALUE FILE
  "$PY" - "$@" <<'EOF'
import json, sys
key, value, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
data = json.load(open(path)); data[key] = value; json.dump(data, open(path, "w"), indent=1)
EOF
}
stage() {  # stage NAME command...
  local name=$1; shift
  echo "[quickstart] == $name ==" >&2
  local start=$EPOCHREALTIME
  "$@"
  record "$name" "$("$PY" -c "print(round($EPOCHREALTIME - $start, 2))")" "$OUT/timings.json"
}
skip() { echo "[quickstart] skipping $1: $2" >&2; record "$1" "\"$2\"" "$OUT/skipped.json"; }

TRAIN=("$PY" -m megapmp.train --config examples/configs/tiny.toml --logging.progress true)
STDLIB=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
D=$OUT/data

# -- data ------------------------------------------------------------------------------------------
stage pairs "$PY" tools/synthesize_pairs.py rules --source "$STDLIB" --output "$D/stdlib_pairs.jsonl" \
  --limit 6000 --seed 0 --stats "$D/stdlib_pairs.stats.json"
# The last 400 pairs (the last modules walked) are held out: other code than the training pairs.
head -n -400 "$D/stdlib_pairs.jsonl" > "$D/pmp_train.jsonl"
tail -n 400 "$D/stdlib_pairs.jsonl" > "$D/pmp_valid.jsonl"

# --overwrite: a rerun into the same folder rebuilds its own shards (preprocessing refuses that by default).
PRE=("$PY" tools/preprocess_pairs.py --max-length 512 --overlong truncate --workers 2 --overwrite)
stage shards_pmp "${PRE[@]}" --input "$D/pmp_train.jsonl" --output-prefix "$D/pmp_train" --tokenizer bpe:4096 --template codepmp
TOK=$D/pmp_train.tokenizer
stage shards_pmp_valid "${PRE[@]}" --input "$D/pmp_valid.jsonl" --output-prefix "$D/pmp_valid" --tokenizer "$TOK" --template codepmp
stage shards_lm "$PY" tools/preprocess_pairs.py --documents --overwrite --input "$STDLIB/json" "$STDLIB/email" "$STDLIB/asyncio" \
  "$STDLIB/collections" "$STDLIB/unittest" "$STDLIB/logging" --output-prefix "$D/lm_docs" --tokenizer "$TOK" --workers 2

GSM8K=$DATA/gsm8k
if [ -f "$GSM8K/train.jsonl" ]; then
  stage pairs_gsm8k "$PY" tools/make_gsm8k_pairs.py --input "$GSM8K/train.jsonl" --output "$D/gsm8k_pairs.jsonl" --limit 3300 --seed 0
  head -n -300 "$D/gsm8k_pairs.jsonl" > "$D/gsm8k_train.jsonl"
  tail -n 300 "$D/gsm8k_pairs.jsonl" > "$D/gsm8k_valid.jsonl"
  stage shards_rm "${PRE[@]}" --input "$D/gsm8k_train.jsonl" --output-prefix "$D/rm_train" --tokenizer "$TOK"
  stage shards_rm_valid "${PRE[@]}" --input "$D/gsm8k_valid.jsonl" --output-prefix "$D/rm_valid" --tokenizer "$TOK"
  RM_TRAIN=$D/rm_train; RM_VALID=$D/rm_valid; RM_EVAL=$D/gsm8k_valid.jsonl
else
  # Without GSM8K the RM stage finetunes on held-out stdlib pairs, so the pipeline still runs end to end.
  skip gsm8k_pairs "no $GSM8K/train.jsonl: RM finetuning uses stdlib pairs instead"
  RM_TRAIN=$D/pmp_train; RM_VALID=$D/pmp_valid; RM_EVAL=$D/pmp_valid.jsonl
fi

# -- training: LM pretraining -> PMP -> RM finetuning ------------------------------------------------
R=$OUT/runs
stage train_lm "${TRAIN[@]}" --run-dir "$R/lm" --data.train "$D/lm_docs" --data.kind documents --loss.rm_coef 0 \
  --data.seq_len 512 --data.items_per_step 8 --data.micro_batches 1 --steps 150 --optimizer.lr 3e-3 --logging.eval_interval 0 --checkpoint.interval 50
stage train_pmp "${TRAIN[@]}" --run-dir "$R/pmp" --data.train "$D/pmp_train" --data.valid "$D/pmp_valid" \
  --data.seq_len 1024 --data.items_per_step 16 --steps 400 --optimizer.lr 2e-3 --logging.eval_interval 50 \
  --checkpoint.interval 50 --checkpoint.init_from "$R/lm" --checkpoint.init_reward_head false
stage train_rm "${TRAIN[@]}" --run-dir "$R/rm" --data.train "$RM_TRAIN" --data.valid "$RM_VALID" --loss.lm_coef 0 \
  --data.seq_len 1024 --data.items_per_step 16 --steps 200 --optimizer.lr 1e-3 --logging.eval_interval 50 \
  --checkpoint.interval 50 --checkpoint.init_from "$R/pmp"

# -- export --------------------------------------------------------------------------------------------
stage export "$PY" tools/convert_checkpoint.py to-hf --input "$R/rm" --output "$OUT/hf" --overwrite

# -- evaluation: the checkpoint with megapmp, then the export with transformers alone ------------------
evaluate() {  # evaluate NAME TASK DATA [extra args...]
  local name=$1 task=$2 data=$3; shift 3
  stage "eval_$name" "$PY" tools/evaluate.py "$task" --model "$R/rm" --data $data --output "$OUT/eval/$name.json" \
    --markdown "$OUT/eval/$name.md" --save-scores "$OUT/eval/$name.scores.jsonl" --threads 2 "$@"
  stage "eval_hf_$name" "$PY" tools/evaluate.py "$task" --backend transformers --model "$OUT/hf" --data $data \
    --output "$OUT/eval_hf/$name.json" --save-scores "$OUT/eval_hf/$name.scores.jsonl" --threads 2 "$@"
}
evaluate rm_accuracy rm-accuracy "$RM_EVAL" --format pairs
if [ -f "$GSM8K/example_model_solutions.jsonl" ]; then
  evaluate gsm8k_best_of_4 best-of-n "$GSM8K/example_model_solutions.jsonl" --format gsm8k-solutions --limit 300 \
    --plot "$OUT/gsm8k_best_of_n.png"
else skip gsm8k_best_of_4 "no $GSM8K/example_model_solutions.jsonl"; fi
if [ -f "$DATA/logiqa2/test.txt" ]; then
  evaluate logiqa2_accuracy multiple-choice "$DATA/logiqa2/test.txt" --format logiqa2 --limit 200
else skip logiqa2_accuracy "no $DATA/logiqa2/test.txt"; fi
CPB=$DATA/codeprefbench
if [ -f "$CPB/correctness-alignment.jsonl.gz" ]; then
  evaluate codeprefbench codeprefbench "$CPB/correctness-alignment.jsonl.gz $CPB/efficiency-alignment.jsonl.gz" --limit 200
else skip codeprefbench "no $CPB/*.jsonl.gz"; fi

"$PY" tools/quickstart_report.py "$OUT"
echo "[quickstart] wrote $OUT/report.json, $OUT/report.md, $OUT/hf/" >&2
