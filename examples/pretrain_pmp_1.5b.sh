#!/usr/bin/env bash
# CodePMP preference-model pretraining of Qwen2-1.5B (Table 3's PMP hyper-parameters, as the 7B script),
# initialised from Qwen2-1.5B. Layout: TP=1 (pure data parallel, ZeRO-1): the 1.5B model, its fp32
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
