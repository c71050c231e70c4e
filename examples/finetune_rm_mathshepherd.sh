#!/usr/bin/env bash
# Reward-model finetuning on MathShepherd-pair (tools/make_rm_pairs.py mathshepherd), preprocessed with --max-length 1024, initialised
# from a PMP run, or for the paper's "without PMP" rows directly from the Qwen2 HF directory of that size.
# Hyper-parameters: CodePMP's Table 3 (Mathematical RM column), in examples/configs/rm_math_{1.5b,7b}.toml,
# chosen by SCALE (7b default): 1 epoch (the step count is derived from the data and printed), 64 pairs per step.
#   SCALE=7b INIT_FROM=runs/pmp-7b TRAIN_DATA=data/mathshepherd/train examples/finetune_rm_mathshepherd.sh
# Held-out accuracy: export (tools/convert_checkpoint.py to-hf) and run tools/evaluate.py rm-accuracy.
cd "$(dirname "$0")/.."
: "${INIT_FROM:?set INIT_FROM to the PMP run directory (or a Qwen2 HF directory)}"
: "${TRAIN_DATA:?set TRAIN_DATA to the preprocessed mathshepherd pair shards}"
SCALE=${SCALE:-7b}
case "$SCALE" in
  7b) TP=${TP:-2}; MICRO_PAIRS=${MICRO_PAIRS:-1} ;;
  1.5b) TP=${TP:-1}; MICRO_PAIRS=${MICRO_PAIRS:-4} ;;
  *) echo "SCALE must be 7b or 1.5b, got '$SCALE'" >&2; exit 2 ;;
esac
RUN_DIR=${RUN_DIR:-runs/rm-mathshepherd-$SCALE}
PP=${PP:-1}
source examples/_launch.sh
launch examples/configs/rm_math_$SCALE.toml 64 --data.train "$TRAIN_DATA" --checkpoint.init_from "$INIT_FROM"
