#!/usr/bin/env bash
# Full-precision fine-tuning of the embedded MiniLM: the teachers of every compression run and the
# full-precision rows of the tables (experiments/results/finetune_fp.{md,csv}).
#
#   bash experiments/run_finetune_fp.sh [--dry-run] [task ...]   (default: rte mrpc stsb cola sst2)
#   python experiments/collect_results.py --runs=workdirs/finetune_fp --name=finetune_fp
#
# Budget: 3 epochs (SST-2: 1 epoch, evaluated every 500 steps), batch 32, full training sets.
# Wall time: 2-core CPU, measured (sum of the runs' wall_time_s): ~50 min (RTE 9, MRPC 11, STS-B 10,
# CoLA 6, SST-2 16); one GPU: not measured yet. Runs land in workdirs/finetune_fp/<task>; finished
# ones are skipped, killed ones resume. --dry-run prints what would run. GLUE: $GLUE_DIR, else
# $MPQBERT_GLUE_DIR, else ../shared/data/glue.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
for task in ${*:-rte mrpc stsb cola sst2}; do
  teacher "$task"
done
