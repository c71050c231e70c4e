#!/usr/bin/env bash
# CodePMP preference-model pretraining of Qwen2-7B (CodePMP Table 3, "CodePMP 7B": 1 epoch, 1024 pairs per
# step, lr 1e-6, WSD with 3% warmup and 10% decay, weight decay 0.1, max length 1024 per sequence -> packed
# rows of 2048 tokens in the duplicated [P C][P R] layout; examples/configs/pmp_7b.toml), initialised from
# Qwen2-7B converted on the fly from its HF directory. The shards must be preprocessed with --max-length
# 1024; the step count is derived from their size (1 epoch) and printed at start.
#
# Layout: TP=2 with sequence parallelism inside a node, no pipeline, data parallel over the rest,
# ZeRO-1 distributed optimizer (fits 80 GB H100s with 2 pairs per micro-batch; see the printed estimate).
# On every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> QWEN2_7B_DIR=/models/Qwen2-7B \
#   TRAIN_DATA=/data/codepmp/train RUN_DIR=/shared/runs/pmp-7b examples/pretrain_pmp_7b.sh
cd "$(dirname "$0")/.."
: "${QWEN2_7B_DIR:?set QWEN2_7B_DIR to a Qwen2-7B Hugging Face directory}"
: "${TRAIN_DATA:?set TRAIN_DATA to the preprocessed pair shards (prefix, comma-separated for several)}"
RUN_DIR=${RUN_DIR:-runs/pmp-7b}
TP=${TP:-2}
PP=${PP:-1}
MICRO_PAIRS=${MICRO_PAIRS:-2}
source examples/_launch.sh
launch examples/configs/pmp_7b.toml 1024 --data.train "$TRAIN_DATA" --checkpoint.init_from "$QWEN2_7B_DIR"
