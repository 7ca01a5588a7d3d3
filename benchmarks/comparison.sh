#!/usr/bin/env bash
# The LaMP-style comparison on our three real-data tasks, one command per task (figures in the closing note and in
# benchmarks/results/). Usage: benchmarks/comparison.sh [movielens|reuters-lead|reuters-authorship|all]
# Data from ../shared/data (DATA=...). Settings of the recorded runs: BM25, k=4; the four model methods and every
# no-model baseline that applies (the default method list; reuters-lead: none, rag and the baselines); movielens: first 100 users, calibrated likelihood scoring
# (contextual calibration of the 5 labels); reuters: all 40 authors; LoRA r=8 on q/k/v/o, 1 epoch over each user's 16
# most recent items (PERSONALIZE_LORA__MAX_ITEMS) to fit a 2-core CPU. Reports carry 95% intervals over users, paired
# tests with Holm's correction and the paper's claims checked (`personalize eval report RUN --json` for tools).
# Each task gets its own home folder: an embedded Chroma folder has one writer at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
HOME_BASE=${HOME_BASE:-.personalize-eval}
export PERSONALIZE_TORCH_THREADS=${PERSONALIZE_TORCH_THREADS:-1}
export PERSONALIZE_LORA__EPOCHS=${PERSONALIZE_LORA__EPOCHS:-1}
export PERSONALIZE_LORA__MAX_ITEMS=${PERSONALIZE_LORA__MAX_ITEMS:-16}
P=${P:-.venv/bin/personalize}
what=${1:-all}
if [[ $what == movielens || $what == all ]]; then
  PERSONALIZE_HOME=$HOME_BASE/movielens $P eval run --task movielens-rating --split test \
    --data "$DATA/movielens-small" --users 100 --retriever bm25 --k 4 \
    --scoring calibrated --train-via workers --workers 1
fi
if [[ $what == reuters-authorship || $what == all ]]; then
  PERSONALIZE_HOME=$HOME_BASE/reuters-authorship $P eval run --task reuters-authorship --split test \
    --data "$DATA/reuters-c50" --retriever bm25 --k 4 --train-via workers --workers 1
fi
if [[ $what == reuters-lead || $what == all ]]; then
  # none, rag and the baselines only: 40 adapters plus 400 more 32-token generations did not fit this session's
  # 2-core budget (METHODS=none,rag,peft,rag+peft,baselines runs them all)
  PERSONALIZE_HOME=$HOME_BASE/reuters-lead $P eval run --task reuters-lead --split test \
    --data "$DATA/reuters-c50" --methods "${METHODS:-none,rag,baselines}" --retriever bm25 --k 4 --max-new-tokens 32 \
    --train-via workers --workers 1
fi
