#!/usr/bin/env bash
# CodePMP preference-model pretraining of Qwen2-1.5B (CodePMP Table 3, "CodePMP 1.5B": 1 epoch, 1024 pairs
# per step, lr 3e-6, WSD with 3% warmup and 10% decay, weight decay 0.1, max length 1024 per sequence;
# examples/configs/pmp_1.5b.toml), initialised from Qwen2-1.5B. The shards must be preprocessed with
# --max-length 1024; the step count is derived from their size (1 epoch) and printed at start. Layout: TP=1 (pure data parallel, ZeRO-1): the 1.5B model, its fp32
# gradients and the sharded optimizer fit one H100 with 4 pairs per micro-batch.
#   NNODES=1 QWEN2_1_5B_DIR=/models/Qwen2-1.5B TRAIN_DATA=/data/codepmp/train examples/pretrain_pmp_1.5b.sh
cd "$(dirname "$0")/.."
: "${QWEN2_1_5B_DIR:?set QWEN2_1_5B_DIR to a Qwen2-1.5B Hugging Face directory}"
: "${TRAIN_DATA:?set TRAIN_DATA to the preprocessed pair shards}"
RUN_DIR=${RUN_DIR:-runs/pmp-1.5b}
TP=${TP:-1}
PP=${PP:-1}
MICRO_PAIRS=${MICRO_PAIRS:-4}
source examples/_launch.sh
launch examples/configs/pmp_1.5b.toml 1024 --data.train "$TRAIN_DATA" --checkpoint.init_from "$QWEN2_1_5B_DIR"
