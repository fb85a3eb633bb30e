#!/usr/bin/env bash
# The study's cells in parallel lanes on one accelerator (a GPU host with several CPU cores):
#
#   TASKS="mrpc stsb cola" COLUMNS=16 bash experiments/study_lanes.sh [--dry-run]
#
# run_study.sh trains one model at a time, which leaves a GPU mostly idle (MiniLM at batch 32) and
# its compilations serial. Here each task's teacher runs first (the tasks' teachers side by side),
# then these lanes, at most $PARALLEL at a time, each a run_study.sh of its own:
#   <task>_hawq, <task>_qbert   every column and seed of the task in order: the first run
#                               measures the Hessian sensitivity that the later ones reuse;
#   <task>_uniform              the uniform rows;
#   <task>_automp<column>_<seed>  one AutoMPQ run each (the longest).
# The runs, their commands and their results are run_study.sh's, so a lane that stops resumes
# with the next call. SensiMix's column (smx) is sequential by nature: run it with run_study.sh.
# On one H100 (JAX 0.11.2), with 15 lanes sharing it, a teacher took about 100 s and a 400-step
# run 1-3 minutes, mostly compilation. Environment: TASKS, COLUMNS, SEEDS ("0 1 2"), PARALLEL (12),
# ROOT (workdirs/study; the lanes' logs go to $ROOT/lanes/).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [[ ${1:-} == --dry-run ]]; then DRY=--dry-run; shift; fi
TASKS=${TASKS:-mrpc stsb cola}
COLUMNS=${COLUMNS:-16}
SEEDS=${SEEDS:-0 1 2}
PARALLEL=${PARALLEL:-12}
LOGS=${ROOT:-workdirs/study}/lanes
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # The lanes share the accelerator's memory.
for column in $COLUMNS; do
  if [[ $column == smx ]]; then
    echo "SensiMix's column runs SensiMix first (the others take its size): use run_study.sh" >&2
    exit 2
  fi
done
mkdir -p "$LOGS"
FAILED=$LOGS/failed_lanes.txt  # The lanes that failed, one per line.
: > "$FAILED"

lane() {  # lane <name> <VAR=value>...: run_study.sh with these settings, its output in one log
  local name=$1; shift
  if env "$@" bash experiments/run_study.sh $DRY > "$LOGS/$name.out" 2>&1; then
    echo "$(date -u +%T) lane $name: done"
  else
    echo "$(date -u +%T) lane $name: FAILED (see $LOGS/$name.out)"; echo "$name" >> "$FAILED"
  fi
}

cells() {  # cells <task>: the task's cells, "task:column ..."
  local column out=""
  for column in $COLUMNS; do out+="$1:$column "; done
  echo "${out% }"
}

for task in $TASKS; do lane "${task}_teacher" CELLS="$(cells "$task")" SEEDS=" " & done
wait
if [[ -s $FAILED ]]; then echo "a teacher failed: no lanes started" >&2; exit 1; fi

specs=()  # "<name>|<cells>|<methods>|<seeds>"
for task in $TASKS; do
  specs+=("${task}_hawq|$(cells "$task")|hawq|$SEEDS" "${task}_qbert|$(cells "$task")|qbert|$SEEDS"
          "${task}_uniform|$(cells "$task")|uniform|$SEEDS")
  for column in $COLUMNS; do
    for seed in $SEEDS; do specs+=("${task}_automp${column}_$seed|$task:$column|automp|$seed"); done
  done
done
for spec in "${specs[@]}"; do
  IFS='|' read -r name cells methods seeds <<< "$spec"
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  lane "$name" CELLS="$cells" METHODS="$methods" SEEDS="$seeds" &
done
wait
[[ ! -s $FAILED ]]
