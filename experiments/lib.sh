# Shared by the run_*.sh experiment scripts (source it): teacher fine-tuning and resumable runs.
#   teacher <task>                        full-precision teacher in workdirs/finetune_fp/<task>
#                                         (the run_finetune_fp.sh row), unless it is there
#   run_method <config> <workdir> <task> [--config.x=y ...]
#                                         one `python -m mpqbert.main` run from that teacher on
#                                         a 4000-example subset; skipped when results.json exists,
#                                         resumed when killed; log in <workdir>.log
# With DRY_RUN=1 (the scripts' --dry-run) both print the command they would run ("todo: ...") or "done: <workdir>", and run
# nothing.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-workdirs/jax_cache}
GLUE_DIR=${GLUE_DIR:-${MPQBERT_GLUE_DIR:-../shared/data/glue}}
DRY_RUN=${DRY_RUN:-0}

# launch <workdir> <command...>: the command, unless <workdir>/results.json exists; output in
# <workdir>.log. In a dry run, prints it instead.
launch() {
  local workdir=$1; shift
  if [[ -f "$workdir/results.json" ]]; then echo "done: $workdir"; return; fi
  if [[ $DRY_RUN == 1 ]]; then echo "todo: $*"; return; fi
  echo "run: $workdir"
  mkdir -p "$(dirname "$workdir")"
  "$@" > "$workdir.log" 2>&1 || { echo "FAILED: $workdir (see $workdir.log)"; return 1; }
  tail -n 1 "$workdir.log"
}

teacher() {
  local task=$1 dir=workdirs/finetune_fp/$1 budget=()
  # SST-2 is 67k examples: one epoch, evaluated every 500 steps; the others three epochs.
  [[ $task == sst2 ]] && budget=(--config.train.num_epochs=1 --config.train.eval_every_steps=500)
  launch "$dir" python -m mpqbert.main --config=configs/finetune.py --config.task="$task" \
    --config.data.glue_dir="$GLUE_DIR" --config.checkpoint.keep=1 "${budget[@]}" \
    --workdir="$dir"
}

run_method() {
  local config=$1 workdir=$2 task=$3; shift 3
  # Single-sentence tasks are short: 64 tokens at most; CoLA (12 tokens on average) pads to 32.
  local seq=128 pad=64
  [[ $task == sst2 || $task == cola ]] && seq=64
  [[ $task == cola ]] && pad=32
  launch "$workdir" python -m mpqbert.main --config="configs/$config.py" --workdir="$workdir" \
    --config.task="$task" --config.data.glue_dir="$GLUE_DIR" \
    --config.teacher.workdir="workdirs/finetune_fp/$task" \
    --config.data.max_seq_length=$seq --config.data.pad_multiple=$pad \
    --config.data.train_subset=4000 --config.checkpoint.every_steps=50 \
    --config.checkpoint.keep=1 "$@"
}
