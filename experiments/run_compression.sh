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
source experiments/lib.sh

run() {  # run <config> <workdir> <task> [overrides...]: the compression budget and search knobs.
  local config=$1 workdir=$2 task=$3; shift 3
  run_method "$config" "$workdir" "$task" --config.train.num_train_steps="$TRAIN_STEPS" \
    --config.search.num_epochs=1.0 --config.search.warmup_epochs=0.2 \
    --config.search.tau_decay=2.0 --config.search.arch_optimizer=adam \
    --config.search.arch_lr=0.05 --config.hessian.power_iterations=8 \
    --config.hessian.num_batches=1 "$@"
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
