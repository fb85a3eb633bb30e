#!/usr/bin/env bash
# The size/accuracy table of issue 5: full precision, uniform 8/4/2-bit QAT, Hessian-assigned and
# AutoMPQ at 8x and 16x, plus the sub-group / bit-choice ablation, on MiniLM.
#
#   bash experiments/run_compression.sh [--dry-run] [task ...]   (default: sst2 mrpc rte stsb cola)
#   python experiments/collect_compression.py    # -> results/compression.{md,csv}, pareto_<task>.png
#
# Budget: every quantized model starts from the full-precision teacher of
# experiments/run_finetune_fp.sh (workdirs/finetune_fp/<task>, fine-tuned first when missing) and
# gets TRAIN_STEPS (default 100) steps of QAT with distillation on a 4000-example training subset;
# the searches take one epoch of the 3200-example weight split. 7 runs per task, plus AutoMPQ at
# 20x and 30x on SST-2 and MRPC, plus the 4 ablation runs on SST-2.
# Wall time: 2-core CPU, measured (sum of the runs' wall_time_s, mostly with a second experiment
# sharing the cores): SST-2 1.6 h, MRPC 2.1 h, RTE 2.3 h, CoLA 1.3 h; one GPU: not measured yet.
# Finished runs are skipped and killed ones resume, so rerunning finishes what is left;
# --dry-run prints the runs and which are done.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
TASKS=${*:-sst2 mrpc rte stsb cola}
ROOT=${ROOT:-workdirs/compression}
TRAIN_STEPS=${TRAIN_STEPS:-100}

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
  teacher "$task"
  run uniform "$d/uniform4" "$task" --config.quant.bits=4
  run automp "$d/automp16" "$task" --config.search.target_compression=16
  run hessian "$d/hessian16" "$task" --config.search.target_compression=16
  run automp "$d/automp8" "$task" --config.search.target_compression=8
  run hessian "$d/hessian8" "$task" --config.search.target_compression=8 \
    --config.hessian.eigenvalues_from="$d/hessian16/hessian_eigenvalues.json"
  run uniform "$d/uniform8" "$task" --config.quant.bits=8
  run uniform "$d/uniform2" "$task" --config.quant.bits=2
  if [[ $task == sst2 || $task == mrpc ]]; then  # The smallest models (issue 8): 20x and 30x.
    run automp "$d/automp20" "$task" --config.search.target_compression=20
    run automp "$d/automp30" "$task" --config.search.target_compression=30
  fi
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
