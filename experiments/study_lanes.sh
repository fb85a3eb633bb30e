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
#   <task>_automp<column>_<seed>  one AutoMPQ run each (the longest);
#   <task>_sensimix_<seed>      SensiMix 3+3 of one seed (COLUMNS with smx), and on SST-2 the
#                               paper's Table 4 ablation of that seed; AutoMPQ's smx lanes wait
#                               for SensiMix seed 0's results.json (they take its size).
# The runs, their commands and their results are run_study.sh's, so a lane that stops resumes
# with the next call. On one H100 (JAX 0.11.2), one task's 16x column (TASKS=stsb: teacher, then
# 9 lanes) took 415 s: teacher 91 s, uniform 114 s, HAWQ-V3 seed 0 257 s (Hessian included) and
# seeds 1-2 130 s each, AutoMPQ 311 s; mostly compilation. Environment: TASKS, COLUMNS, SEEDS
# ("0 1 2"), PARALLEL (12), ROOT (workdirs/study; the lanes' logs go to $ROOT/lanes/).
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
# Deterministic GPU ops (sorted scatters instead of atomics, no timing-based autotuning): meant to
# make a teacher retrained in a later session equal the one a task's finished runs paired with,
# so a column can be finished there (collect_study.py checks); the CPU ignores it.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_deterministic_ops=true"
HESSIAN_COLUMNS=""  # The columns HAWQ-V3 runs at: all but SensiMix's.
for column in $COLUMNS; do [[ $column == smx ]] || HESSIAN_COLUMNS+="$column "; done
HESSIAN_COLUMNS=${HESSIAN_COLUMNS% }
FIRST_SEED=${SEEDS%% *}
mkdir -p "$LOGS"
FAILED=$LOGS/failed_lanes.txt  # The lanes that failed, one per line.
: > "$FAILED"
rm -f "$LOGS"/*.ended  # A lane's end marker (its waiters give up on it) is per call.

failed() {  # failed <lane> <why>
  echo "$(date -u +%T) lane $1: FAILED ($2)"; echo "$1" >> "$FAILED"
}

lane() {  # lane <name> <VAR=value>...: run_study.sh with these settings, its output in one log
  local name=$1; shift
  if env "$@" bash experiments/run_study.sh $DRY > "$LOGS/$name.out" 2>&1; then
    echo "$(date -u +%T) lane $name: done"
  else
    failed "$name" "see $LOGS/$name.out"
  fi
  touch "$LOGS/$name.ended"
}

# wait_for <lane> <file>...: wait until one of the files exists; fails once <lane> ended without
# any (with <lane> "", at once: nothing in this call will write them).
wait_for() {
  local lane=$1 file; shift
  [[ -n $DRY ]] && return 0
  while true; do
    for file; do [[ -f $file ]] && return 0; done
    if [[ -z $lane || -f $LOGS/$lane.ended ]]; then
      for file; do [[ -f $file ]] && return 0; done
      echo "${lane:-no lane of this call} ended without $*" >&2; return 1
    fi
    sleep 5
  done
}

# hawq_lane <name> <task> <seed>: one seed's HAWQ-V3 runs; a later seed's after the first seed's
# run measured the Hessian sensitivity, which it reuses from where run_study.sh looks for it.
hawq_lane() {
  local name=$1 task=$2 seed=$3 column=${HESSIAN_COLUMNS%% *}
  local shared="$ROOT/$task/hawq_sensitivity.json"
  local measured="$ROOT/$task/hawq${column}_seed$FIRST_SEED/sensitivity.json"
  if [[ $seed != "$FIRST_SEED" ]]; then
    wait_for "${task}_hawq_$FIRST_SEED" "$shared" "$measured" || {
      failed "$name" "no shared sensitivity"; return; }
    [[ -n $DRY || -f $shared ]] || { cp "$measured" "$shared.tmp" && mv "$shared.tmp" "$shared"; }
  fi
  lane "$name" CELLS="$(cells "$task" "$HESSIAN_COLUMNS")" METHODS=hawq SEEDS="$seed"
}

# sensimix_size_lane <name> <task> <seed>: AutoMPQ at SensiMix's size, once SensiMix seed 0 (of
# this call's lane, or of an earlier call) has its results.json.
sensimix_size_lane() {
  local name=$1 task=$2 seed=$3 first=""
  [[ " $SEEDS " == *" 0 "* ]] && first=${task}_sensimix_0
  wait_for "$first" "$ROOT/$task/sensimix_seed0/results.json" || {
    failed "$name" "no SensiMix seed 0 to take the size of"; return; }
  lane "$name" CELLS="$task:smx" METHODS=automp SEEDS="$seed"
}

cells() {  # cells <task> [<columns>]: the task's cells, "task:column ..." ($COLUMNS by default)
  local column out=""
  for column in ${2-$COLUMNS}; do out+="$1:$column "; done
  echo "${out% }"
}

for task in $TASKS; do lane "${task}_teacher" CELLS="$(cells "$task")" SEEDS=" " & done
wait
if [[ -s $FAILED ]]; then echo "a teacher failed: no lanes started" >&2; exit 1; fi

# Lanes "<name>|<task>|<kind>|<cells>|<seed(s)>", those that others wait for first.
specs=()
for task in $TASKS; do
  if [[ -n $HESSIAN_COLUMNS ]]; then
    for seed in $SEEDS; do specs+=("${task}_hawq_$seed|$task|hawq||$seed"); done
  fi
  if [[ " $COLUMNS " == *" smx "* ]]; then
    for seed in $SEEDS; do specs+=("${task}_sensimix_$seed|$task|sensimix|$task:smx|$seed"); done
  fi
done
for task in $TASKS; do
  specs+=("${task}_qbert|$task|qbert|$(cells "$task")|$SEEDS")
  for seed in $SEEDS; do specs+=("${task}_uniform_$seed|$task|uniform|$(cells "$task")|$seed"); done
  for column in $COLUMNS; do
    for seed in $SEEDS; do
      specs+=("${task}_automp${column}_$seed|$task|automp$column|$task:$column|$seed")
    done
  done
done
for spec in "${specs[@]}"; do
  IFS='|' read -r name task kind cells seeds <<< "$spec"
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  case $kind in
    hawq) hawq_lane "$name" "$task" "$seeds" & ;;
    autompsmx) sensimix_size_lane "$name" "$task" "$seeds" & ;;
    automp*) lane "$name" CELLS="$cells" METHODS=automp SEEDS="$seeds" & ;;
    *) lane "$name" CELLS="$cells" METHODS="$kind" SEEDS="$seeds" & ;;
  esac
done
wait
[[ ! -s $FAILED ]]
