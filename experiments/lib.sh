# Shared by the run_*.sh experiment scripts (source it): teacher fine-tuning and resumable runs.
#   teacher <task>                        full-precision teacher in workdirs/finetune_fp/<task>
#                                         (run_finetune_fp.sh's command), unless it is there
#   run_method <config> <workdir> <task> [--config.x=y ...]
#                                         one `python -m mpqbert.main` run from that teacher on
#                                         a 4000-example subset; skipped when results.json exists,
#                                         resumed when killed; log in <workdir>.log
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-workdirs/jax_cache}

teacher() {
  local task=$1 epochs=3 dir=workdirs/finetune_fp/$1
  if [[ -f "$dir/results.json" ]]; then return; fi
  [[ $task == sst2 ]] && epochs=1
  echo "teacher: $dir"
  mkdir -p workdirs/finetune_fp
  python -m mpqbert.main --config=configs/finetune.py --config.task="$task" \
    --config.data.glue_dir=../shared/data/glue --config.checkpoint.keep=1 \
    --config.train.num_epochs=$epochs --workdir="$dir" > "$dir.log" 2>&1 \
    || { echo "FAILED: $dir"; return 1; }
  tail -n 1 "$dir.log"
}

run_method() {
  local config=$1 workdir=$2 task=$3; shift 3
  if [[ -f "$workdir/results.json" ]]; then echo "done: $workdir"; return; fi
  # Single-sentence tasks are short: 64 tokens at most; CoLA (12 tokens on average) pads to 32.
  local seq=128 pad=64
  [[ $task == sst2 || $task == cola ]] && seq=64
  [[ $task == cola ]] && pad=32
  echo "run: $workdir"
  mkdir -p "$(dirname "$workdir")"
  python -m mpqbert.main --config="configs/$config.py" --workdir="$workdir" \
    --config.task="$task" --config.data.glue_dir=../shared/data/glue \
    --config.teacher.workdir="workdirs/finetune_fp/$task" \
    --config.data.max_seq_length=$seq --config.data.pad_multiple=$pad \
    --config.data.train_subset=4000 --config.checkpoint.every_steps=50 \
    --config.checkpoint.keep=1 "$@" > "$workdir.log" 2>&1 || { echo "FAILED: $workdir"; return 1; }
  tail -n 1 "$workdir.log"
}
