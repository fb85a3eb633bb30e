#!/usr/bin/env bash
# The study's cells in parallel lanes on one accelerator (a GPU host with several CPU cores):
#
#   TASKS="mrpc stsb cola" COLUMNS=16 bash experiments/study_lanes.sh [--dry-run]
#
# run_study.sh trains one model at a time, which leaves a GPU mostly idle (MiniLM at batch 32) and
# its compilations serial. Here each task's teacher runs first (the tasks' teachers side by side),
# then these lanes, at most $PARALLEL at a time, each a run_study.sh of its own:
#   <task>_hawq_<seed>          HAWQ-V3 at every column of one seed: the first seed's lane
#                               measures the Hessian sensitivity, the other seeds' lanes wait for
#                               its sensitivity.json and reuse it (run_study.sh's protocol);
#   <task>_qbert                Q-BERT at every column and seed in order (only at 8x and 12x);
#   <task>_uniform_<seed>       the uniform rows of one seed;
#   <task>_automp<column>_<seed>  one AutoMPQ run each (the longest).
# The runs, their commands and their results are run_study.sh's, so a lane that stops resumes
# with the next call. SensiMix's column (smx) is sequential by nature: run it with run_study.sh.
# On one H100 (JAX 0.11.2), one task's 16x column (TASKS=stsb: teacher, then 9 lanes) took 415 s:
# teacher 91 s, uniform 114 s, HAWQ-V3 seed 0 257 s (Hessian included) and seeds 1-2 130 s each,
# AutoMPQ 311 s; mostly compilation. Environment: TASKS, COLUMNS, SEEDS ("0 1 2"), PARALLEL (12),
# ROOT (workdirs/study; the lanes' logs go to $ROOT/lanes/).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [[ ${1:-} == --dry-run ]]; then DRY=--dry-run; shift; fi
TASKS=${TASKS:-mrpc stsb cola}
COLUMNS=${COLUMNS:-16}
SEEDS=${SEEDS:-0 1 2}
PARALLEL=${PARALLEL:-12}
ROOT=${ROOT:-workdirs/study}
LOGS=$ROOT/lanes
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
rm -f "$LOGS"/*.ended  # A lane's end marker (its waiters give up on it) is per call.

lane() {  # lane <name> <VAR=value>...: run_study.sh with these settings, its output in one log
  local name=$1; shift
  if env "$@" bash experiments/run_study.sh $DRY > "$LOGS/$name.out" 2>&1; then
    echo "$(date -u +%T) lane $name: done"
  else
    echo "$(date -u +%T) lane $name: FAILED (see $LOGS/$name.out)"; echo "$name" >> "$FAILED"
  fi
  touch "$LOGS/$name.ended"
}

# shared_sensitivity <task> <method> <first lane>: wait until the first seed's run of the task has
# measured the Hessian sensitivity, and put it where run_study.sh reuses it; fails if that lane
# ended without it.
shared_sensitivity() {
  local task=$1 method=$2 first_lane=$3 column=${COLUMNS%% *} seed=${SEEDS%% *}
  local shared="$ROOT/$task/${method}_sensitivity.json"
  local measured="$ROOT/$task/$method${column}_seed$seed/sensitivity.json"
  [[ -n $DRY ]] && return 0
  until [[ -f $shared || -f $measured ]]; do
    [[ -f $LOGS/$first_lane.ended ]] && { echo "$first_lane ended without $measured" >&2; return 1; }
    sleep 5
  done
  [[ -f $shared ]] || { cp "$measured" "$shared.tmp" && mv "$shared.tmp" "$shared"; }
}

hawq_lane() {  # hawq_lane <name> <task> <seed>: one seed's HAWQ-V3 runs, after the shared Hessian
  local name=$1 task=$2 seed=$3 first="${2}_hawq_${SEEDS%% *}"
  if [[ $seed != "${SEEDS%% *}" ]] && ! shared_sensitivity "$task" hawq "$first"; then
    echo "$(date -u +%T) lane $name: FAILED (no shared sensitivity)"; echo "$name" >> "$FAILED"
    return
  fi
  lane "$name" CELLS="$(cells "$task")" METHODS=hawq SEEDS="$seed"
}

cells() {  # cells <task>: the task's cells, "task:column ..."
  local column out=""
  for column in $COLUMNS; do out+="$1:$column "; done
  echo "${out% }"
}

for task in $TASKS; do lane "${task}_teacher" CELLS="$(cells "$task")" SEEDS=" " & done
wait
if [[ -s $FAILED ]]; then echo "a teacher failed: no lanes started" >&2; exit 1; fi

specs=()  # "<name>|<cells>|<methods>|<seeds>"; the HAWQ-V3 lanes first (they wait on each other)
for task in $TASKS; do
  for seed in $SEEDS; do specs+=("${task}_hawq_$seed|$task|hawq|$seed"); done
done
for task in $TASKS; do
  specs+=("${task}_qbert|$(cells "$task")|qbert|$SEEDS")
  for seed in $SEEDS; do specs+=("${task}_uniform_$seed|$(cells "$task")|uniform|$seed"); done
  for column in $COLUMNS; do
    for seed in $SEEDS; do specs+=("${task}_automp${column}_$seed|$task:$column|automp|$seed"); done
  done
done
for spec in "${specs[@]}"; do
  IFS='|' read -r name cells methods seeds <<< "$spec"
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  if [[ $methods == hawq ]]; then
    hawq_lane "$name" "$cells" "$seeds" &
  else
    lane "$name" CELLS="$cells" METHODS="$methods" SEEDS="$seeds" &
  fi
done
wait
[[ ! -s $FAILED ]]
