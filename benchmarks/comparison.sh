#!/usr/bin/env bash
# The LaMP-style comparison on our three real-data tasks, one command per task (figures in the closing note).
# Usage: benchmarks/comparison.sh [movielens|reuters-lead|reuters-authorship|all]   (data from ../shared/data)
# Settings used for the recorded runs: BM25, k=4, likelihood scoring for label tasks, LoRA r=8 on q/k/v/o,
# 1 epoch over each user's 64 most recent items (PERSONALIZE_LORA__MAX_ITEMS) to fit a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
export PERSONALIZE_HOME=${PERSONALIZE_HOME:-.personalize-eval}
export PERSONALIZE_LORA__EPOCHS=${PERSONALIZE_LORA__EPOCHS:-1}
export PERSONALIZE_LORA__MAX_ITEMS=${PERSONALIZE_LORA__MAX_ITEMS:-64}
P=${P:-.venv/bin/personalize}
what=${1:-all}
if [[ $what == movielens || $what == all ]]; then
  $P eval run --task movielens-rating --split test --data "$DATA/movielens-small" --users 100 \
    --methods none,rag,peft,rag+peft --retriever bm25 --k 4 --train-via workers --workers 1
fi
if [[ $what == reuters-authorship || $what == all ]]; then
  $P eval run --task reuters-authorship --split test --data "$DATA/reuters-c50" \
    --methods none,rag --retriever bm25 --k 4
fi
if [[ $what == reuters-lead || $what == all ]]; then
  $P eval run --task reuters-lead --split test --data "$DATA/reuters-c50" \
    --methods none,rag --retriever bm25 --k 4 --max-new-tokens 32
fi
