# Shared by the run_*.sh experiment scripts (source it): resumable runs and teacher fine-tuning.
#   launch <workdir> <command...>   the command, unless <workdir>/results.json exists
#   teacher <task>                  full-precision teacher in workdirs/finetune_fp/<task>
#                                   (the run_finetune_fp.sh row), unless it is there
# With DRY_RUN=1 (the scripts' --dry-run) both print the command they would run ("todo: ...") or
# "done: <workdir>", and run nothing.
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
