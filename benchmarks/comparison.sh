#!/usr/bin/env bash
# The LaMP-style comparison on our three real-data tasks (figures in the closing note and in benchmarks/results/).
# Usage: benchmarks/comparison.sh [movielens|reuters-lead|reuters-authorship|all]
#
# Each task: first a task adapter (one LoRA on pooled pairs of the evaluated users' profiles, time cut: only what
# each user had before their first test query; about half the pairs carry BM25 k=4 context from the user's earlier
# items), then the evaluation on the task-adapted base: none, rag, peft, rag+peft, zero-shot (the plain base) and
# every no-model baseline that applies. Per-user LoRA uses the defaults: all of the user's items, 2 epochs, capped
# at PERSONALIZE_LORA__MAX_TOKENS=4000 tokens, so the budget grows with the user's data up to the cap.
# movielens: first 100 users, likelihood scoring of the 5 labels; reuters: all 40 authors. Reports carry 95%
# intervals over users, paired tests with Holm's correction and the paper's claims checked
# (`personalize eval report RUN --json` for tools). METHODS=... overrides the method list (the reuters runs of
# session 6 ran none,rag,zero-shot,baselines: per-user adapters for 40 authors did not fit its 2-core budget; its
# reuters-authorship task adapter ran with PERSONALIZE_TASK_ADAPTER__MAX_TOKENS=80000 for the same reason).
# Each task gets its own home folder: an embedded Chroma folder has one writer at a time.
# The PEFT family (issue 15): PEFT_METHODS=lora,ia3,prompt-tuning,p-tuning,prefix-tuning,distill adds peft:<m> and
# rag+peft:<m> for each; ADAPTER_TOKENS=N sets one per-user token budget for every adapter method (distill's teacher
# then answers only the DISTILL_ITEMS most recent items, default 16: what N=1000 trains on); WORKERS=N training
# workers (default 1), each with an equal share of the cores for torch while the eval process waits.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
HOME_BASE=${HOME_BASE:-.personalize-eval}
export PERSONALIZE_TORCH_THREADS=${PERSONALIZE_TORCH_THREADS:-1}
P=${P:-.venv/bin/personalize}
what=${1:-all}
methods() { if [[ -n ${METHODS:-} ]]; then echo "--methods $METHODS"; fi; }
# DECISION=median: movielens answers the median of the label distribution (MAE's loss) instead of the argmax
decision() { if [[ -n ${DECISION:-} ]]; then echo "--decision $DECISION"; fi; }
# USERS=N: only the first N users of a reuters task (movielens always runs its first 100)
users() { if [[ -n ${USERS:-} ]]; then echo "--users $USERS"; fi; }
family() { if [[ -n ${PEFT_METHODS:-} ]]; then echo "--peft-methods $PEFT_METHODS"; fi; }
if [[ -n ${ADAPTER_TOKENS:-} ]]; then
  for m in LORA IA3 PROMPT_TUNING P_TUNING PREFIX_TUNING DISTILL; do export "PERSONALIZE_${m}__MAX_TOKENS=$ADAPTER_TOKENS"; done
  export PERSONALIZE_DISTILL__MAX_ITEMS=${DISTILL_ITEMS:-16}
fi
WORKERS=${WORKERS:-1}
if [[ $what == movielens || $what == all ]]; then
  export PERSONALIZE_HOME=$HOME_BASE/movielens
  $P task-adapter list | grep -q '^movielens-rating@' || $P task-adapter train --task movielens-rating \
    --data "$DATA/movielens-small" --split test --users 100 --retriever bm25 --k 4
  # shellcheck disable=SC2046
  $P eval run --task movielens-rating --split test --data "$DATA/movielens-small" --users 100 --retriever bm25 \
    --k 4 --scoring likelihood --train-via workers --workers "$WORKERS" $(methods) $(decision) $(family)
fi
if [[ $what == reuters-authorship || $what == all ]]; then
  export PERSONALIZE_HOME=$HOME_BASE/reuters-authorship
  $P task-adapter list | grep -q '^reuters-authorship@' || $P task-adapter train --task reuters-authorship \
    --data "$DATA/reuters-c50" --split test --retriever bm25 --k 4
  # shellcheck disable=SC2046
  $P eval run --task reuters-authorship --split test --data "$DATA/reuters-c50" --retriever bm25 --k 4 $(users) \
    --train-via workers --workers "$WORKERS" $(methods) $(family)
fi
if [[ $what == reuters-lead || $what == all ]]; then
  export PERSONALIZE_HOME=$HOME_BASE/reuters-lead
  $P task-adapter list | grep -q '^reuters-lead@' || $P task-adapter train --task reuters-lead \
    --data "$DATA/reuters-c50" --split test --retriever bm25 --k 4
  # shellcheck disable=SC2046
  $P eval run --task reuters-lead --split test --data "$DATA/reuters-c50" --retriever bm25 --k 4 $(users) \
    --max-new-tokens 32 --train-via workers --workers "$WORKERS" $(methods) $(family)
fi
