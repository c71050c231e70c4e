#!/usr/bin/env bash
# Reward-model finetuning on mathshepherd pairs (loss.lm_coef = 0), initialised from a PMP run (or, for the
# no-PMP baseline, directly from a Qwen2 HF directory). Hyper-parameters: examples/configs/rm_mathshepherd.toml;
# read the notes there -- values not confirmed against the paper's Table 3 are marked as such.
#   INIT_FROM=runs/pmp-7b TRAIN_DATA=/data/mathshepherd/train examples/finetune_rm_mathshepherd.sh
# Held-out accuracy: export (tools/convert_checkpoint.py to-hf) and run tools/evaluate.py.
# (model.preset must match the initial weights: PRESET=qwen2-1.5b for a 1.5B PMP run.)
cd "$(dirname "$0")/.."
: "${INIT_FROM:?set INIT_FROM to the PMP run directory (or a Qwen2 HF directory)}"
: "${TRAIN_DATA:?set TRAIN_DATA to the preprocessed mathshepherd pair shards}"
RUN_DIR=${RUN_DIR:-runs/rm-mathshepherd}
PRESET=${PRESET:-qwen2-7b}
TP=${TP:-2}
PP=${PP:-1}
MICRO_PAIRS=${MICRO_PAIRS:-1}
source examples/_launch.sh
launch examples/configs/rm_mathshepherd.toml ${PAIRS_PER_STEP:-64} --data.train "$TRAIN_DATA" \
    --checkpoint.init_from "$INIT_FROM" --model.preset "$PRESET"
