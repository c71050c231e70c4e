#!/usr/bin/env bash
# CodeFavor's pipeline on a CPU, after the quickstart (its BPE tokenizer, LM-pretrained model and scalar RM):
#   Commit-Instruct pairs from git histories -> judge samples in both orders -> a pairwise judge trained from
#   the quickstart's LM (LM term on the label token only) -> CodePrefBench judged by it (--judge pairwise) and
#   by the quickstart's scalar RM (--judge reward), plus the judge and the RM on held-out commit pairs.
#
#   bash examples/codefavor.sh QUICKSTART_DIR OUT_DIR GIT_REPO [GIT_REPO ...]
#
# QUICKSTART_DIR is what `bash examples/quickstart.sh QUICKSTART_DIR` wrote. Every GIT_REPO is a local clone
# with its history (Commit-Instruct reads small one-function Python commits); the last 10% of each repo's
# pairs (its newest commits) are held out. CodePrefBench is read from $MEGAPMP_DATA/codeprefbench (default
# ../shared/data): evaluation only, never trained on. Settings: JUDGE_STEPS (default 300), JUDGE_LR (1e-3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ $# -lt 3 ]; then sed -n '2,13p' "$0"; exit 2; fi
QS=$(cd "$1" && pwd); OUT=$2; shift 2
DATA=${MEGAPMP_DATA:-$ROOT/../shared/data}
PY=${PYTHON:-python3}
STEPS=${JUDGE_STEPS:-300}
LR=${JUDGE_LR:-1e-3}
mkdir -p "$OUT"/{pairs,data,runs,eval}
OUT=$(cd "$OUT" && pwd)
export TOKENIZERS_PARALLELISM=false
log() { echo "[codefavor] $*" >&2; }

# -- Commit-Instruct (model-free: message -> code after / code before) ------------------------------------
: > "$OUT/pairs/train.jsonl"; : > "$OUT/pairs/heldout.jsonl"
for repo in "$@"; do
  name=$(basename "$(cd "$repo" && pwd)"); [ "$name" = repo ] && name=$(basename "$(dirname "$(cd "$repo" && pwd)")")
  if [ ! -f "$OUT/pairs/$name.jsonl" ]; then  # a rerun keeps the pairs it has (walking a big history takes minutes)
    log "Commit-Instruct: $repo"
    "$PY" tools/synthesize_pairs.py commits --repo "$repo" --output "$OUT/pairs/$name.jsonl" \
      --stats "$OUT/pairs/$name.stats.json" --no-progress > /dev/null
  fi
  n=$(wc -l < "$OUT/pairs/$name.jsonl"); keep=$(( n - n / 10 ))
  head -n "$keep" "$OUT/pairs/$name.jsonl" >> "$OUT/pairs/train.jsonl"
  tail -n +"$(( keep + 1 ))" "$OUT/pairs/$name.jsonl" >> "$OUT/pairs/heldout.jsonl"
done
log "$(wc -l < "$OUT/pairs/train.jsonl") training pairs, $(wc -l < "$OUT/pairs/heldout.jsonl") held out"

# Held-out pairs in CodePrefBench's format (gt_choice from a seeded coin), so both judges read them alike.
"$PY" - "$OUT/pairs/heldout.jsonl" "$OUT/data/commit-instruct-heldout.jsonl" <<'EOF'
import json, random, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for r in rows:
        gt = random.Random(r["id"]).randrange(2)
        choices = [r["chosen"], r["rejected"]] if gt == 0 else [r["rejected"], r["chosen"]]
        f.write(json.dumps({"task_id": r["id"], "instruction": r["prompt"], "choices": choices, "gt_choice": gt}) + "\n")
EOF

# -- judge samples and training ----------------------------------------------------------------------------
log "judge samples (both orders)"
"$PY" tools/make_judge_data.py --input "$OUT/pairs/train.jsonl" --output-prefix "$OUT/data/judge" --both-order \
  --tokenizer "$QS/data/pmp_train.tokenizer" --max-length 2048 --overlong truncate --workers 2 --overwrite \
  --no-progress > "$OUT/data/judge.stats.json"
log "training the judge ($STEPS steps, from the quickstart's LM)"
"$PY" -m megapmp.train --config examples/configs/tiny.toml --run-dir "$OUT/runs/judge" --data.train "$OUT/data/judge" \
  --data.layout shared-prefix --loss.rm_coef 0 --loss.lm_coef 1 --data.seq_len 4096 --data.items_per_step 16 \
  --data.micro_batches 1 --steps "$STEPS" --optimizer.lr "$LR" --logging.eval_interval 0 --checkpoint.interval 100 \
  --checkpoint.init_from "$QS/runs/lm" --checkpoint.init_reward_head false --logging.progress true

# -- evaluation: the judge and the scalar RM on the same tasks -----------------------------------------------
CPB=$DATA/codeprefbench
evaluate() {  # evaluate NAME JUDGE MODEL DATA...
  local name=$1 judge=$2 model=$3; shift 3
  "$PY" tools/evaluate.py codeprefbench --judge "$judge" --model "$model" --data "$@" --output "$OUT/eval/$name.json" \
    --markdown "$OUT/eval/$name.md" --threads 2 --no-progress
}
evaluate judge_codeprefbench pairwise "$OUT/runs/judge" "$CPB"
evaluate rm_codeprefbench reward "$QS/runs/rm" "$CPB"
evaluate judge_heldout pairwise "$OUT/runs/judge" "$OUT/data/commit-instruct-heldout.jsonl"
evaluate rm_heldout reward "$QS/runs/rm" "$OUT/data/commit-instruct-heldout.jsonl"
"$PY" - "$OUT/eval" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("| data | aspect | pairs | pairwise judge | scalar RM |\n|---|---|---|---|---|")
for data in ("codeprefbench", "heldout"):
    judge = json.loads((root / f"judge_{data}.json").read_text())["results"]
    rm = json.loads((root / f"rm_{data}.json").read_text())["results"]
    for aspect, v in judge["aspects"].items():
        print(f"| {data} | {aspect} | {v['pairs']} | {v['accuracy']:.4f} | {rm['aspects'][aspect]['accuracy']:.4f} |")
    print(f"| {data} | overall | {judge['pairs']} | {judge['overall']:.4f} | {rm['overall']:.4f} |")
EOF
log "wrote $OUT/eval/"
