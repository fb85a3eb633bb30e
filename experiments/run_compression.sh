#!/usr/bin/env bash
# The size/accuracy table of issue 5: full precision, uniform 8/4/2-bit QAT, Hessian-assigned and
# AutoMPQ at 8x and 16x, plus the sub-group / bit-choice ablation, on MiniLM.
#
#   bash experiments/run_compression.sh [task ...]     (default: sst2 mrpc rte stsb cola)
#
# Every quantized model starts from the full-precision teacher of experiments/run_finetune_fp.sh
# (workdirs/finetune_fp/<task>, fine-tuned first when missing) and gets the same budget: TRAIN_STEPS steps of QAT with
# distillation on a 4000-example training subset. A run whose results.json exists is skipped and
# a killed run resumes, so rerunning this script finishes what is left. Then:
#   python experiments/collect_compression.py
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${*:-sst2 mrpc rte stsb cola}
ROOT=${ROOT:-workdirs/compression}
TRAIN_STEPS=${TRAIN_STEPS:-100}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-workdirs/jax_cache}

run() {  # run <config> <workdir> [overrides...]
  local config=$1 workdir=$2 task=$3; shift 3
  if [[ -f "$workdir/results.json" ]]; then echo "done: $workdir"; return; fi
  local seq=128; [[ $task == sst2 || $task == cola ]] && seq=64
  echo "run: $workdir"
  python -m mpqbert.main --config="configs/$config.py" --workdir="$workdir" \
    --config.task="$task" --config.data.glue_dir=../shared/data/glue \
    --config.teacher.workdir="workdirs/finetune_fp/$task" \
    --config.data.max_seq_length=$seq --config.data.pad_multiple=64 \
    --config.data.train_subset=4000 --config.train.num_train_steps="$TRAIN_STEPS" \
    --config.search.num_epochs=1.0 --config.search.warmup_epochs=0.2 \
    --config.search.tau_decay=2.0 --config.search.arch_optimizer=adam \
    --config.search.arch_lr=0.05 --config.hessian.power_iterations=8 \
    --config.hessian.num_batches=1 --config.checkpoint.every_steps=50 \
    --config.checkpoint.keep=1 "$@" > "$workdir.log" 2>&1 || { echo "FAILED: $workdir"; return 1; }
  tail -n 1 "$workdir.log"
}

teacher() {  # teacher <task>: the full-precision fine-tuning of run_finetune_fp.sh, if missing.
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

for task in $TASKS; do
  d=$ROOT/$task
  mkdir -p "$d"
  teacher "$task"
  run uniform "$d/uniform4" "$task" --config.quant.bits=4
  run automp "$d/automp16" "$task" --config.search.target_compression=16
  run hessian "$d/hessian16" "$task" --config.search.target_compression=16
  run automp "$d/automp8" "$task" --config.search.target_compression=8
  run hessian "$d/hessian8" "$task" --config.search.target_compression=8 \
    --config.hessian.eigenvalues_from="$d/hessian16/hessian_eigenvalues.json"
  run uniform "$d/uniform8" "$task" --config.quant.bits=8
  run uniform "$d/uniform2" "$task" --config.quant.bits=2
  if [[ $task == sst2 ]]; then  # Ablation (the paper's Table 2) at 16x.
    run automp "$d/ablation_groups1" "$task" --config.search.target_compression=16 \
      --config.quant.groups=1
    run automp "$d/ablation_groups128" "$task" --config.search.target_compression=16 \
      --config.quant.groups=128
    run automp "$d/ablation_bits024" "$task" --config.search.target_compression=16 \
      --config.quant.bit_choices="(0,2,4)"
    run automp "$d/ablation_sgd" "$task" --config.search.target_compression=16 \
      --config.search.arch_optimizer=sgd --config.search.arch_lr=0.1
  fi
done
