#!/usr/bin/env bash
# Issue 20's head-to-head: AutoMPQ at the exact size of uniform 2-bit (16x) against uniform
# 2-bit QAT, same teacher, same retrain budget, 3 seeds, on SST-2 and MRPC.
#
#   bash experiments/run_head_to_head.sh [--dry-run] [task ...]      (default: sst2 mrpc)
#   python experiments/collect_head_to_head.py   # -> results/head_to_head.{md,csv}
#
# Budget (the quickstart's): 4000 training examples at most; teacher 1 epoch (SST-2, 64 tokens)
# or 3 epochs (MRPC, 128 tokens); every quantized model 100 QAT steps with distillation; the
# search one epoch of its weight split (SST-2 100 steps, MRPC 92). The seed sets the data order,
# dropout, Gumbel noise and the sensitivity batches of the compression runs; the teacher is one
# per task (seed 0). Finished runs are skipped, killed ones resume.
# Wall time on 2 CPU cores: SST-2 ~8 min per seed, MRPC ~20 min per seed, teachers ~15 min.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
TASKS=${*:-sst2 mrpc}
ROOT=${ROOT:-workdirs/head_to_head}
SEEDS=${SEEDS:-0 1 2}

settings() {  # settings <task>: sequence length and padding of the task's runs
  case $1 in
    sst2) echo "--config.data.max_seq_length=64 --config.data.pad_multiple=32" ;;
    *) echo "--config.data.max_seq_length=128 --config.data.pad_multiple=64" ;;
  esac
}

for task in $TASKS; do
  d=$ROOT/$task
  epochs=3; [[ $task == sst2 ]] && epochs=1
  # shellcheck disable=SC2046
  launch "$d/teacher" python -m mpqbert.main --config=configs/finetune.py --workdir="$d/teacher" \
    --config.task="$task" --config.data.glue_dir="$GLUE_DIR" $(settings "$task") \
    --config.data.train_subset=4000 --config.train.num_epochs=$epochs --config.checkpoint.keep=1
  for seed in $SEEDS; do
    common=(--config.task="$task" --config.data.glue_dir="$GLUE_DIR" --config.seed="$seed"
            --config.teacher.workdir="$d/teacher" --config.data.train_subset=4000
            --config.train.num_train_steps=100 --config.checkpoint.every_steps=50
            --config.checkpoint.keep=1)
    # shellcheck disable=SC2046
    launch "$d/uniform2_seed$seed" python -m mpqbert.main --config=configs/uniform.py \
      --workdir="$d/uniform2_seed$seed" "${common[@]}" $(settings "$task") --config.quant.bits=2
    # shellcheck disable=SC2046
    launch "$d/automp_seed$seed" python -m mpqbert.main --config=configs/automp.py \
      --workdir="$d/automp_seed$seed" "${common[@]}" $(settings "$task") \
      --config.search.target_uniform_bits=2 \
      --config.search.num_epochs=1.0 --config.search.warmup_epochs=0.2 \
      --config.search.tau_decay=2.0
  done
done
