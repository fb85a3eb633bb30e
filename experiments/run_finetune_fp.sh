#!/usr/bin/env bash
# Full-precision fine-tuning of the embedded MiniLM on five GLUE tasks (issue: foundation).
# Each command is resumable: rerunning this script continues killed runs from their checkpoints.
# Results: <runs>/<task>/results.json, gathered by experiments/collect_results.py.
#   bash experiments/run_finetune_fp.sh [RUNS_DIR] [GLUE_DIR]
set -euo pipefail
RUNS=${1:-workdirs/finetune_fp}
GLUE=${2:-${MPQBERT_GLUE_DIR:-../shared/data/glue}}
run() {  # task, extra flags...
  local task=$1; shift
  python -m mpqbert.main --config=configs/finetune.py --config.task="$task" \
    --config.data.glue_dir="$GLUE" --config.checkpoint.keep=1 "$@" --workdir="$RUNS/$task"
}
run rte
run mrpc
run stsb
run cola
run sst2 --config.train.num_epochs=1 --config.train.eval_every_steps=500
