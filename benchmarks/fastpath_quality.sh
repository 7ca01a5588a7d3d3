#!/usr/bin/env bash
# Quality of the fast decoder against the plain path (issue 7): the same evaluation twice, PERSONALIZE_DECODER=plain
# then =fast (and fast-fp32 with FP32=1), compared metric by metric with `personalize eval compare` (tolerance 1%).
# movielens-rating dev, first 40 users, none/rag/peft, free generation (so decoding is what answers);
# reuters-lead dev, first 40 authors, none/rag/peft, the first query of each author (PER_USER=5 for all five);
# its adapters train on each author's 8 most recent articles (READ_ITEMS) to keep the run near an hour.
# Adapters are trained once (plain run) and reused by the fast run (same home, same data).
# `training`: the fast training step against peft's own (PERSONALIZE_LORA__TRAINER=plain, then =fast), each in its
# own home so each trains its own adapters, method peft, both with the fast decoder: movielens-rating and reuters-lead
# as above (`training-movielens` or `training-reuters-lead` for one of them).
# `task-adapted` (issue 14): the same two checks on a task-adapted base (the task adapter merged into the weights):
# a small task adapter (PERSONALIZE_TASK_ADAPTER__MAX_TOKENS=30000) on movielens-rating dev's first USERS (20)
# users, then plain vs fast decoder (none/rag/peft, free generation) and plain vs fast trainer (peft).
# `precision` (issue 17 target 6): the bf16 training path against fp32, both on one training step (TRAINER=fast, the
# default, or plain), each in its own home: PERSONALIZE_LORA__PRECISION=fp32, then =bf16 (the fast step's frozen
# projections on bf16 weight copies, or the plain step under bf16 autocast; LoRA weights and optimizer state fp32),
# method peft, movielens-rating and reuters-lead dev as above (`precision-movielens` or `precision-reuters-lead` for
# one; USERS=N for the first N users instead of 40). On a CPU without fast bf16 the bf16 side runs, slowly, all the
# same.
# Usage: benchmarks/fastpath_quality.sh [movielens|reuters-lead|all|training|training-movielens|training-reuters-lead|
#        precision|precision-movielens|precision-reuters-lead|task-adapted]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
what=${1:-all}
default_home=.personalize-quality
[[ $what == task-adapted ]] && default_home=.personalize-quality-task  # its own home: every adapter on the task base
export PERSONALIZE_HOME=${PERSONALIZE_HOME:-$default_home}
export PERSONALIZE_LORA__EPOCHS=${PERSONALIZE_LORA__EPOCHS:-1}
export PERSONALIZE_LORA__MAX_ITEMS=${PERSONALIZE_LORA__MAX_ITEMS:-16}
P=${P:-.venv/bin/personalize}
decoders=(plain fast)
[[ ${FP32:-0} == 1 ]] && decoders+=(fast-fp32)

run_pair() {  # run the same evaluation with each decoder, then compare each against plain
  local ids=()
  for decoder in "${decoders[@]}"; do
    ids+=("$(PERSONALIZE_DECODER=$decoder $P eval run "$@" | tail -n 1 | awk '{print $NF}')")
  done
  for id in "${ids[@]:1}"; do
    $P eval compare "${ids[0]}" "$id" --tolerance 0.01 || true
  done
}

if [[ $what == movielens || $what == all ]]; then
  run_pair --task movielens-rating --split dev --data "$DATA/movielens-small" --users 40 \
    --methods none,rag,peft --scoring generate --max-new-tokens 4 --retriever bm25 --k 4 --workers 1
fi
if [[ $what == reuters-lead || $what == all ]]; then
  PERSONALIZE_LORA__MAX_ITEMS=${READ_ITEMS:-8} run_pair --task reuters-lead --split dev --data "$DATA/reuters-c50" \
    --users 40 --per-user "${PER_USER:-1}" --methods none,rag,peft --max-new-tokens 32 --retriever bm25 --k 4
fi
side_home() {  # a home of its own for one side of a pair, reusing the model cache and any task adapter
  local home=$1
  if [[ ! -d $home/models && -d $PERSONALIZE_HOME/models ]]; then  # reuse the dequantised model cache
    mkdir -p "$home" && cp -r "$PERSONALIZE_HOME/models" "$home/models"
  fi
  if [[ ! -d $home/adapters/_tasks && -d $PERSONALIZE_HOME/adapters/_tasks ]]; then  # the same task adapter
    mkdir -p "$home/adapters" && cp -r "$PERSONALIZE_HOME/adapters/_tasks" "$home/adapters/_tasks"
  fi
}
setting_pair() {  # the same evaluation with each value of one setting, each in its own home (its own adapters)
  local ids=() tag=$1 var=$2 first=$3 second=$4
  shift 4
  for value in "$first" "$second"; do
    side_home "$PERSONALIZE_HOME-$tag-$value"
    ids+=("$(env PERSONALIZE_HOME="$PERSONALIZE_HOME-$tag-$value" "$var=$value" $P eval run "$@" | tail -n 1 | awk '{print $NF}')")
  done
  echo "== $tag: $var=$first vs $second"
  PERSONALIZE_HOME="$PERSONALIZE_HOME-$tag-$first" $P eval compare "${ids[0]}" "${ids[1]}" --tolerance 0.01 \
    --candidate-home "$PERSONALIZE_HOME-$tag-$second" || true
}
train_pair() {  # the plain training step against the fast one
  local tag=$1
  shift
  setting_pair "$tag-trainer" PERSONALIZE_LORA__TRAINER plain fast "$@"
}
precision_pair() {  # issue 17 target 6: one training step (TRAINER) with the frozen base in fp32, then in bf16
  local tag=$1 trainer=${TRAINER:-fast}
  shift
  PERSONALIZE_LORA__TRAINER=$trainer setting_pair "$tag-$trainer-precision" PERSONALIZE_LORA__PRECISION fp32 bf16 "$@"
}

if [[ $what == training || $what == training-movielens ]]; then
  train_pair movielens-rating --task movielens-rating --split dev --data "$DATA/movielens-small" --users 40 \
    --methods peft --scoring generate --max-new-tokens 4 --retriever bm25 --k 4 --workers 1
fi
if [[ $what == training || $what == training-reuters-lead ]]; then
  PERSONALIZE_LORA__MAX_ITEMS=${READ_ITEMS:-8} train_pair reuters-lead --task reuters-lead --split dev \
    --data "$DATA/reuters-c50" --users 40 --per-user "${PER_USER:-1}" --methods peft --max-new-tokens 32 \
    --retriever bm25 --k 4
fi
if [[ $what == precision || $what == precision-movielens ]]; then
  precision_pair movielens-rating --task movielens-rating --split dev --data "$DATA/movielens-small" --users "${USERS:-40}" \
    --methods peft --scoring generate --max-new-tokens 4 --retriever bm25 --k 4 --workers 1
fi
if [[ $what == precision || $what == precision-reuters-lead ]]; then
  PERSONALIZE_LORA__MAX_ITEMS=${READ_ITEMS:-8} precision_pair reuters-lead --task reuters-lead --split dev \
    --data "$DATA/reuters-c50" --users "${USERS:-40}" --per-user "${PER_USER:-1}" --methods peft --max-new-tokens 32 \
    --retriever bm25 --k 4
fi
if [[ $what == task-adapted ]]; then
  users=${USERS:-20}
  $P task-adapter list | grep -q '^movielens-rating@' || PERSONALIZE_TASK_ADAPTER__MAX_TOKENS=${TA_TOKENS:-30000} \
    $P task-adapter train --task movielens-rating --data "$DATA/movielens-small" --split dev --users "$users"
  run_pair --task movielens-rating --split dev --data "$DATA/movielens-small" --users "$users" \
    --methods none,rag,peft --scoring generate --max-new-tokens 4 --retriever bm25 --k 4 --workers 1
  train_pair movielens-rating-task-adapted --task movielens-rating --split dev --data "$DATA/movielens-small" \
    --users "$users" --methods peft --scoring generate --max-new-tokens 4 --retriever bm25 --k 4 --workers 1
fi
