#!/usr/bin/env bash
# The CodePMP paper (arXiv 2410.02229) end to end, every stage in order:
#   1. pair synthesis: a strong and a weak code model (6.7B / 1.3B deepseek-coder-instruct in the paper) write
#      descriptions of source code, then the chosen and the rejected code for each (section 3.2, Algorithm 1)
#   2. shards (tokenized offline, max length 1024)
#   3. PMP (Table 3, "CodePMP")
#   4. the RM finetuning data of appendix D (MathShepherd-pair, ReClor-pair, LogiQA2.0-pair)
#   5. RM finetuning, each task with PMP and without (Table 3, "Mathematical RM" / "Logical RM")
#   6. Best-of-N candidates (MetaMath-Mistral-7B, N up to 256, GSM8K and MATH)
#   7. evaluation: RM accuracy (Table 1), Best-of-N over N (Fig. 3), multiple choice = Best-of-4 (4.1.3)
#   8. the figures and a report
#
#   bash examples/reproduce_codepmp.sh --scale tiny [OUT_DIR]       a CPU, minutes (a CI test runs it)
#   DRY_RUN=1 bash examples/reproduce_codepmp.sh --scale 7b         print every stage's command
#   bash examples/reproduce_codepmp.sh --scale 1.5b|7b [OUT_DIR]    on GPUs (environment below)
#
# --scale tiny: the models are trained here from scratch (nothing can be downloaded): a tiny Qwen2 LM
# pretrained on Python's standard library is the base model, and two of its checkpoints, exported as HF causal
# LMs and served on loopback by tools/serve_models.py, are the strong (more steps) and the weak (fewer steps)
# generator. Data: $MEGAPMP_DATA (default ../shared/data: GSM8K and LogiQA 2.0), or, where that is absent,
# the small synthetic files in the same formats in tests/fixtures/data (OUT/report.md says which). Without
# Math-Shepherd ($MATHSHEPHERD), the math RM finetunes on GSM8K-derived pairs (tools/make_gsm8k_pairs.py); ReClor
# is not shared, so ReClor-pair's recipe (options) runs on LogiQA 2.0. Hyper-parameters follow Table 3's shape
# (1 epoch, WCD and no weight decay for RMs, the logical RM's 25% warmup) with a tiny model's learning rates.
#
# --scale 1.5b|7b (GPUs; each stage as the paper ran it, Table 3 through examples/*.sh). Environment:
#   QWEN2_DIR        Qwen2-1.5B / Qwen2-7B HF directory (the base model and the "without PMP" initialisation)
#   CODE_DIR         source code to synthesize pairs from (the paper: GitHub)
#   STRONG_MODEL, WEAK_MODEL   (deepseek-coder-6.7b-instruct, deepseek-coder-1.3b-instruct; vLLM in process)
#   MATHSHEPHERD     Math-Shepherd JSONL;  RECLOR_TRAIN, RECLOR_VAL  ReClor's train.json / val.json
#   LOGIQA2_TRAIN, LOGIQA2_TEST   LogiQA 2.0 lines; LOGIQA_URL + LOGIQA_MODELS (comma-separated served names)
#   for LogiQA2.0-pair's samplers; JUDGE_URL + JUDGE_MODEL for its judge (default: the rule)
#   GSM8K_TEST, MATH_TEST   the Best-of-N questions;  BON_MODEL (meta-math/MetaMath-Mistral-7B)
#   NNODES, GPUS_PER_NODE, ... as examples/_launch.sh reads them
# DRY_RUN=1 prints each stage's command and runs nothing.
set -euo pipefail

SCALE=tiny
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=${2:?--scale needs tiny, 1.5b or 7b}; shift 2 ;;
    --scale=*) SCALE=${1#--scale=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "reproduce_codepmp.sh: unknown option $1 (--scale tiny|1.5b|7b [OUT_DIR])" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
case "$SCALE" in tiny|1.5b|7b) ;; *) echo "reproduce_codepmp.sh: --scale must be tiny, 1.5b or 7b, got '$SCALE'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-runs/reproduce-$SCALE}
DRY_RUN=${DRY_RUN:-0}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
export TOKENIZERS_PARALLELISM=false
# One thread per process at tiny scale: the models are too small to gain from more, and on a shared machine
# (CI, or this project's) oversubscribed threads are what slows every stage down.
[ "$SCALE" = tiny ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$DRY_RUN" != 1 ]; then
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  echo "{}" > "$OUT/timings.json"
fi
D=$OUT/data; R=$OUT/runs; E=$OUT/eval; M=$OUT/models

say() { echo "[reproduce] $*" >&2; }
record_time() {  # record_time NAME SECONDS
  "$PY" - "$OUT/timings.json" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = json.load(open(path)); data[key] = round(value, 2); json.dump(data, open(path, "w"), indent=1)
EOF
}
run() {  # run STAGE command...: prints the command; runs it unless DRY_RUN=1
  local name=$1; shift
  say "== $name =="
  printf '  ' >&2; printf '%q ' "$@" >&2; echo >&2
  [ "$DRY_RUN" = 1 ] && return 0
  local start=$EPOCHREALTIME
  "$@"
  record_time "$name" "$(awk "BEGIN {print $EPOCHREALTIME - $start}")"
}

# ================================================================================================ tiny (CPU)
reproduce_tiny() {
  local data=${MEGAPMP_DATA:-$ROOT/../shared/data} data_source=shared
  if [ ! -f "$data/gsm8k/train.jsonl" ] || [ ! -f "$data/logiqa2/dev.txt" ]; then
    say "no GSM8K / LogiQA 2.0 under $data: using the synthetic fixtures in tests/fixtures/data (same formats)"
    data=$ROOT/tests/fixtures/data data_source=fixtures
  fi
  [ "$DRY_RUN" = 1 ] || printf '{"data": "%s", "source": "%s", "mathshepherd": "%s"}\n' "$data" "$data_source" \
    "${MATHSHEPHERD:-}" > "$OUT/data_used.json"
  local stdlib train=("$PY" -m megapmp.train --config examples/configs/tiny.toml --logging.progress false
                      --logging.eval_interval 0 --num_threads 1)
  stdlib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  local pre=("$PY" tools/preprocess_pairs.py --max-length 512 --overlong truncate --overwrite --no-progress)

  # -- the base LM, and the strong and weak generators (two of its checkpoints) ---------------------------
  run lm_docs "$PY" tools/preprocess_pairs.py --documents --overwrite --no-progress --input "$stdlib/json" \
    "$stdlib/email" "$stdlib/asyncio" "$stdlib/collections" "$stdlib/logging" --output-prefix "$D/lm_docs" \
    --tokenizer bpe:2048 --workers 1
  local tok=$D/lm_docs.tokenizer
  run train_lm "${train[@]}" --run-dir "$R/lm" --data.train "$D/lm_docs" --data.kind documents --loss.rm_coef 0 \
    --data.seq_len 512 --data.items_per_step 4 --data.micro_batches 1 --steps 40 --optimizer.lr 3e-3 \
    --checkpoint.interval 10 --checkpoint.keep_last 0
  run export_strong "$PY" tools/convert_checkpoint.py to-hf --input "$R/lm/checkpoints/step_00000040" \
    --output "$M/strong" --overwrite
  run export_weak "$PY" tools/convert_checkpoint.py to-hf --input "$R/lm/checkpoints/step_00000010" \
    --output "$M/weak" --overwrite
  local url=http://127.0.0.1:PORT
  say "== serve_models (background) =="
  printf '  ' >&2; printf '%q ' "$PY" tools/serve_models.py --model "$M/strong" --model "$M/weak" --port 0 --threads 1 >&2; echo >&2
  if [ "$DRY_RUN" != 1 ]; then
    "$PY" tools/serve_models.py --model "$M/strong" --model "$M/weak" --port 0 --threads 1 > "$OUT/serve.port" \
      2> "$OUT/serve.log" &
    SERVER_PID=$!
    trap '[ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null || true' EXIT
    for _ in $(seq 600); do grep -q '^port ' "$OUT/serve.port" 2>/dev/null && break
      kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }; sleep 0.1; done
    url=http://127.0.0.1:$(awk '/^port /{print $2}' "$OUT/serve.port")
  fi
  local served=(--backend openai --base-url "$url" --mode completions --seed 0 --no-progress)

  # -- 1. CodePMP pairs: descriptions by the strong model, chosen by the strong, rejected by the weak one ---
  run collect "$PY" tools/synthesize_pairs.py collect --source "$stdlib/json" "$stdlib/email" --languages python \
    --output "$D/snippets.jsonl" --no-progress
  run summarize "$PY" tools/synthesize_pairs.py summarize --input "$D/snippets.jsonl" --output "$D/descriptions.jsonl" \
    --model strong --limit 64 --max-tokens 32 "${served[@]}"
  run generate "$PY" tools/synthesize_pairs.py generate --input "$D/descriptions.jsonl" --output "$D/codepmp_pairs.jsonl" \
    --strong-model strong --weak-model weak --max-tokens 48 --min-length-ratio 0.2 --max-length-ratio 5 "${served[@]}"
  # -- 2. shards ------------------------------------------------------------------------------------------
  run shards_pmp "${pre[@]}" --input "$D/codepmp_pairs.jsonl" --output-prefix "$D/pmp" --tokenizer "$tok" \
    --template codepmp
  # -- 3. PMP (the tiny model's Table 3 shape: WSD; its own learning rate and batch) ----------------------
  run train_pmp "${train[@]}" --run-dir "$R/pmp" --data.train "$D/pmp" --data.seq_len 1024 --data.items_per_step 8 \
    --data.micro_batches 1 --steps 0 --epochs 2 --optimizer.lr 2e-3 --checkpoint.interval 0 \
    --checkpoint.init_from "$R/lm" --checkpoint.init_reward_head false

  # -- 4. RM finetuning data (appendix D) ------------------------------------------------------------------
  if [ -n "${MATHSHEPHERD:-}" ]; then
    run pairs_math "$PY" tools/make_rm_pairs.py mathshepherd --input "$MATHSHEPHERD" --style 40k \
      --output-dir "$D/math" --overwrite
  else  # GSM8K-derived pairs stand in for MathShepherd-pair: one pair per question, so head/tail split by question
    run pairs_math "$PY" tools/make_gsm8k_pairs.py --input "$data/gsm8k/train.jsonl" --output "$D/gsm8k_pairs.jsonl" \
      --limit 200 --seed 0
    if [ "$DRY_RUN" != 1 ]; then
      mkdir -p "$D/math"
      local n; n=$(wc -l < "$D/gsm8k_pairs.jsonl"); n=$(( n / 10 > 0 ? n / 10 : 1 ))
      head -n "-$n" "$D/gsm8k_pairs.jsonl" > "$D/math/train.jsonl"; tail -n "$n" "$D/gsm8k_pairs.jsonl" > "$D/math/test.jsonl"
    fi
  fi
  # The logical RM trains on groups (issue 22): each question's four options once, right vs every wrong one in
  # the loss (--data.layout group below); the test side stays pairs for rm-accuracy.
  run pairs_logic "$PY" tools/make_rm_pairs.py options --input "$data/logiqa2/dev.txt" --limit 80 \
    --exclude "$data/logiqa2/test.txt" --output-dir "$D/logic" --overwrite --groups
  run pairs_logic_sampled "$PY" tools/make_rm_pairs.py sampled --input "$data/logiqa2/dev.txt" --limit 6 \
    --exclude "$data/logiqa2/test.txt" \
    --model strong --model weak --grid 0,0.5,1 --max-tokens 24 --output-dir "$D/logic_sampled" --overwrite \
    --test-fraction 0.34 "${served[@]}"
  run shards_math_train "${pre[@]}" --input "$D/math/train.jsonl" --output-prefix "$D/math_train" --tokenizer "$tok"
  run shards_logic_train "${pre[@]}" --groups --input "$D/logic/train.jsonl" --output-prefix "$D/logic_train" \
    --tokenizer "$tok"
  # -- 5. RM finetuning with and without PMP (Table 3's RM shape: 1 epoch, WCD, weight decay 0) ------------
  local warmup task init layout items
  for task in math logic; do
    warmup=0.03; layout=duplicated; items=16
    # logic: 6 groups of 4 options = 18 pairs per step, the math task's 16 pairs about
    [ "$task" = logic ] && warmup=0.25 && layout=group && items=6
    for init in pmp base; do  # base: the LM before PMP, a fresh reward head (the paper's "without PMP")
      run "train_rm_${task}_${init}" "${train[@]}" --run-dir "$R/rm_${task}_${init}" --data.train "$D/${task}_train" \
        --loss.lm_coef 0 --data.seq_len 1024 --data.layout $layout --data.items_per_step $items --data.micro_batches 1 \
        --steps 0 --epochs 1 \
        --schedule.name wcd --schedule.warmup_fraction $warmup --schedule.decay_fraction 0 \
        --optimizer.weight_decay 0 --optimizer.lr 1e-3 --checkpoint.interval 0 \
        --checkpoint.init_from "$R/$([ "$init" = pmp ] && echo pmp || echo lm)" \
        --checkpoint.init_reward_head $([ "$init" = pmp ] && echo true || echo false)
    done
  done
  # -- 6. Best-of-N candidates: the strong model on GSM8K test questions ------------------------------------
  run candidates_gsm8k "$PY" tools/generate_candidates.py math --data "$data/gsm8k/test.jsonl" --limit 12 --n 8 \
    --max-tokens 24 --output "$D/gsm8k_candidates.jsonl" --model strong "${served[@]}"
  if [ "$DRY_RUN" != 1 ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; fi

  # -- 7. evaluation --------------------------------------------------------------------------------------
  local ev=("$PY" tools/evaluate.py) evo=(--threads 1 --no-progress)
  for task in math logic; do
    for init in pmp base; do
      run "eval_${task}_${init}_rm_accuracy" "${ev[@]}" rm-accuracy "${evo[@]}" --model "$R/rm_${task}_${init}" \
        --data "$D/$task/test.jsonl" --output "$E/${task}_${init}_rm_accuracy.json"
    done
  done
  for init in pmp base; do
    run "eval_math_${init}_bon_candidates" "${ev[@]}" best-of-n "${evo[@]}" --model "$R/rm_math_${init}" \
      --data "$D/gsm8k_candidates.jsonl" --mc-draws 0 --output "$E/math_${init}_bon_candidates.json"
    run "eval_math_${init}_bon_gsm8k_solutions" "${ev[@]}" best-of-n "${evo[@]}" --model "$R/rm_math_${init}" \
      --data "$data/gsm8k/example_model_solutions.jsonl" --limit 60 --mc-draws 0 \
      --output "$E/math_${init}_bon_gsm8k_solutions.json"
    run "eval_logic_${init}_mc_logiqa2" "${ev[@]}" multiple-choice "${evo[@]}" --model "$R/rm_logic_${init}" \
      --data "$data/logiqa2/test.txt" --limit 100 --output "$E/logic_${init}_mc_logiqa2.json"
  done
  # -- 8. figures and report ------------------------------------------------------------------------------
  run report "$PY" tools/reproduce_report.py --output "$OUT" --scale tiny
}

# ================================================================================================ 1.5b / 7b (GPUs)
reproduce_gpu() {
  local q=${QWEN2_DIR:-/models/Qwen2-$([ "$SCALE" = 7b ] && echo 7B || echo 1.5B)}
  local code=${CODE_DIR:-/data/github-code} strong=${STRONG_MODEL:-deepseek-ai/deepseek-coder-6.7b-instruct}
  local weak=${WEAK_MODEL:-deepseek-ai/deepseek-coder-1.3b-instruct} bon=${BON_MODEL:-meta-math/MetaMath-Mistral-7B}
  local vllm=(--backend vllm --gpu-memory-utilization 0.45 --seed 0 --no-progress)
  local pre=("$PY" tools/preprocess_pairs.py --tokenizer "$q" --max-length 1024 --overlong truncate --workers 16
             --no-progress)
  local qdir_var; qdir_var=$([ "$SCALE" = 7b ] && echo QWEN2_7B_DIR || echo QWEN2_1_5B_DIR)

  # -- 1. CodePMP pairs (section 3.2, 4.1.1: deepseek-coder 6.7B strong, 1.3B weak) ------------------------
  run collect "$PY" tools/synthesize_pairs.py collect --source "$code" --languages all --output "$D/snippets.jsonl" --no-progress
  run summarize "$PY" tools/synthesize_pairs.py summarize --input "$D/snippets.jsonl" --output "$D/descriptions.jsonl" \
    --model "$strong" "${vllm[@]}"
  run generate "$PY" tools/synthesize_pairs.py generate --input "$D/descriptions.jsonl" --output "$D/codepmp_pairs.jsonl" \
    --strong-model "$strong" --weak-model "$weak" "${vllm[@]}"
  # -- 2. shards (Table 3: max length 1024) -----------------------------------------------------------------
  run shards_pmp "${pre[@]}" --input "$D/codepmp_pairs.jsonl" --output-prefix "$D/pmp" --template codepmp
  # -- 3. PMP (Table 3, CodePMP column) ----------------------------------------------------------------------
  run train_pmp env "$qdir_var=$q" TRAIN_DATA="$D/pmp" RUN_DIR="$R/pmp" bash "examples/pretrain_pmp_$SCALE.sh"
  # -- 4. RM finetuning data (appendix D) ------------------------------------------------------------------
  run pairs_mathshepherd "$PY" tools/make_rm_pairs.py mathshepherd --input "${MATHSHEPHERD:-/data/math-shepherd.jsonl}" \
    --style 40k --output-dir "$D/mathshepherd" --on-error skip --rejects "$D/mathshepherd_rejects.jsonl" --overwrite
  run pairs_reclor "$PY" tools/make_rm_pairs.py options --input "${RECLOR_TRAIN:-/data/reclor/train.json}" \
    --test-input "${RECLOR_VAL:-/data/reclor/val.json}" --output-dir "$D/reclor" --overwrite
  local samplers=() m judge=()
  IFS=, read -r -a models <<< "${LOGIQA_MODELS:-Qwen2-7B-Instruct,Qwen2-72B-Instruct,DeepSeek-V2-Chat,DeepSeek-Coder-V2-Instruct}"
  for m in "${models[@]}"; do samplers+=(--model "$m"); done
  [ -n "${JUDGE_URL:-}" ] && judge=(--judge-url "$JUDGE_URL" --judge-model "${JUDGE_MODEL:?JUDGE_MODEL with JUDGE_URL}")
  run pairs_logiqa2 "$PY" tools/make_rm_pairs.py sampled --input "${LOGIQA2_TRAIN:-/data/logiqa2/train.txt}" \
    --backend openai --base-url "${LOGIQA_URL:-http://127.0.0.1:8000}" "${samplers[@]}" ${judge[@]+"${judge[@]}"} \
    --exclude "${LOGIQA2_TEST:-../shared/data/logiqa2/test.txt}" --output-dir "$D/logiqa2" --overwrite --no-progress
  local task
  for task in mathshepherd reclor logiqa2; do
    run "shards_${task}_train" "${pre[@]}" --input "$D/$task/train.jsonl" --output-prefix "$D/${task}_train"
  done
  # -- 5. RM finetuning, with PMP and without (Table 3, through examples/finetune_rm_*.sh) ------------------
  local init from
  for task in mathshepherd reclor logiqa2; do
    for init in pmp base; do
      from=$R/pmp; [ "$init" = base ] && from=$q
      run "train_rm_${task}_${init}" env SCALE="$SCALE" INIT_FROM="$from" TRAIN_DATA="$D/${task}_train" \
        RUN_DIR="$R/rm_${task}_${init}" bash "examples/finetune_rm_$task.sh"
    done
  done
  # -- 6. Best-of-N candidates (MetaMath-Mistral-7B, N = 256) -------------------------------------------------
  run candidates_gsm8k "$PY" tools/generate_candidates.py math --backend vllm --model "$bon" \
    --data "${GSM8K_TEST:-../shared/data/gsm8k/test.jsonl}" --n 256 --seed 0 --output "$D/gsm8k_candidates.jsonl" --no-progress
  run candidates_math "$PY" tools/generate_candidates.py math --backend vllm --model "$bon" \
    --data "${MATH_TEST:-/data/math/test.jsonl}" --n 256 --seed 0 --output "$D/math_candidates.jsonl" --no-progress
  # -- 7. evaluation (Table 1's RM accuracy, Fig. 3's Best-of-N over N, multiple choice = Best-of-4) ----------
  local ev=("$PY" tools/evaluate.py) evo=(--no-progress)
  for init in pmp base; do
    for task in mathshepherd reclor logiqa2; do
      run "eval_${task}_${init}_rm_accuracy" "${ev[@]}" rm-accuracy "${evo[@]}" --model "$R/rm_${task}_${init}" \
        --data "$D/$task/test.jsonl" --output "$E/${task}_${init}_rm_accuracy.json"
    done
    for bset in gsm8k math; do
      run "eval_mathshepherd_${init}_bon_$bset" "${ev[@]}" best-of-n "${evo[@]}" --model "$R/rm_mathshepherd_${init}" \
        --data "$D/${bset}_candidates.jsonl" --output "$E/mathshepherd_${init}_bon_$bset.json"
    done
    for task in reclor logiqa2; do
      run "eval_${task}_${init}_mc_reclor" "${ev[@]}" multiple-choice "${evo[@]}" --model "$R/rm_${task}_${init}" \
        --data "${RECLOR_VAL:-/data/reclor/val.json}" --output "$E/${task}_${init}_mc_reclor.json"
      run "eval_${task}_${init}_mc_logiqa2" "${ev[@]}" multiple-choice "${evo[@]}" --model "$R/rm_${task}_${init}" \
        --data "${LOGIQA2_TEST:-../shared/data/logiqa2/test.txt}" --output "$E/${task}_${init}_mc_logiqa2.json"
    done
  done
  # -- 8. figures and report ------------------------------------------------------------------------------
  run report "$PY" tools/reproduce_report.py --output "$OUT" --scale "$SCALE"
}

start=$EPOCHREALTIME
if [ "$SCALE" = tiny ]; then reproduce_tiny; else reproduce_gpu; fi
[ "$DRY_RUN" = 1 ] && { say "dry run: nothing was run"; exit 0; }
record_time total "$(awk "BEGIN {print $EPOCHREALTIME - $start}")"
say "done in $(awk "BEGIN {printf \"%.0f\", $EPOCHREALTIME - $start}") s: $OUT/report.md"
