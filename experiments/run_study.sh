#!/usr/bin/env bash
# The study (issue 21): every method against uniform quantization at equal size, 3 seeds, one
# teacher per task, the same retrain budget for every quantized model.
#
#   bash experiments/run_study.sh [--dry-run] [task ...]   (default: every cell of $CELLS)
#   python experiments/collect_study.py                     # -> results/study.{md,csv}, plots
#
# A cell is task:column; the columns are size targets of the encoder matrices (scales included):
#   16  uniform 2-bit's exact size (its uniform row: uniform2)
#    8  uniform 4-bit's exact size (uniform4)
#   12  12x float32; no uniform model has this size: uniform 3-bit (9.6x, larger) is its row
#   24  24x float32; its uniform row is uniform 2-bit (16x, larger)
#  smx  SensiMix 3+3's size: SensiMix (the authors' recipe from the same teacher, at the
#       study's budget: sensimix.init=teacher, batch 32, 400 steps), AutoMPQ at SensiMix's
#       size, and on SST-2 the paper's Table 4 ablation (no ABWR, no PT, no ILF); its uniform
#       rows are uniform 4-bit (smaller) and uniform 8-bit (larger)
# Methods ($METHODS): automp (configs/automp.py), hawq (HAWQ-V3), qbert (Q-BERT), sensimix (smx
# cells only). Q-BERT's {2, 3, 4, 8} without pruning is uniform 2-bit at 16x and cannot reach
# 24x: it runs at 8x and 12x.
#
# Budget: teachers fine-tuned on the full training set (SST-2 1 epoch at 64 tokens, CoLA 3 epochs
# at 64, MRPC and STS-B 3 epochs at 128). Every quantized model: 400 QAT steps of 32 examples of
# the full training set with distillation. AutoMPQ's search: 2 epochs over at most 4000 training
# examples (200 steps). Q-BERT and HAWQ measure the teacher's Hessian on 10 batches of 16 (HAWQ:
# 32 Rademacher vectors each; with 4, 14 of the 36 matrix traces were within 1 standard error of
# 0), once per task (their seed-0 run): later seeds and columns reuse that sensitivity.json
# (hessian.sensitivity_from), so their seeds vary the retrain only.
# The seed sets the data order, dropout, Gumbel noise, the search split and the quantizer start.
#
# Environment: ROOT (workdirs/study), SEEDS ("0 1 2"), METHODS ("uniform sensimix automp hawq qbert"),
# CELLS (the queue's order: the cells the aims need first). Finished runs are skipped, killed
# ones resume: run it again, in the background, as often as needed.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
ROOT=${ROOT:-workdirs/study}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-uniform sensimix automp hawq qbert}  # SensiMix first: AutoMPQ takes its size
CELLS=${CELLS:-sst2:16 sst2:8 sst2:12 sst2:smx mrpc:16 stsb:16 cola:16 sst2:24 mrpc:smx \
stsb:smx mrpc:8 stsb:8 cola:8 mrpc:12 stsb:12 cola:12 mrpc:24 stsb:24 cola:24}
TASKS=${*:-}

data_flags() {  # data_flags <task>: sequence length and padding of every run of the task
  case $1 in
    sst2|cola) echo "--config.data.max_seq_length=64 --config.data.pad_multiple=32" ;;
    *) echo "--config.data.max_seq_length=128 --config.data.pad_multiple=64" ;;
  esac
}

target_flags() {  # target_flags <column> <task>: the size target
  case $1 in
    16) echo "--config.search.target_uniform_bits=2" ;;
    8) echo "--config.search.target_uniform_bits=4" ;;
    smx) echo "--config.search.target_size_mb=$(sensimix_size "$2")" ;;
    *) echo "--config.search.target_compression=$1" ;;
  esac
}

sensimix_size() {  # sensimix_size <task>: size_mb of its SensiMix seed-0 run (it runs first)
  local result="$ROOT/$1/sensimix_seed0/results.json"
  if [[ -f $result ]]; then
    python -c "import json, sys; print(json.load(open(sys.argv[1]))['size_mb'])" "$result"
  else
    echo "SIZE_OF_$1_SENSIMIX_SEED0"
  fi
}

uniform_bits() {  # uniform_bits <column>: the column's uniform rows
  case $1 in 16|24) echo 2 ;; 8) echo 4 ;; 12) echo 3 ;; smx) echo "4 8" ;; esac
}

# sensimix_runs <task> <seed>: SensiMix 3+3 and, on SST-2, the paper's Table 4 ablation
sensimix_runs() {
  local task=$1 seed=$2 name flags
  local common=(--config.sensimix.init=teacher --config.train.batch_size=32)
  quantized sensimix "$ROOT/$task/sensimix_seed$seed" "$task" "$seed" "${common[@]}"
  [[ $task == sst2 ]] || return 0
  for ablation in "no_abwr --config.sensimix.abwr_weight=0" \
                  "no_pt --config.sensimix.prioritized_training=False" \
                  "no_ilf --config.sensimix.inverse_layerwise=False"; do
    read -r name flags <<< "$ablation"
    quantized sensimix "$ROOT/$task/sensimix_${name}_seed$seed" "$task" "$seed" \
      "${common[@]}" "$flags"
  done
}

teacher_run() {
  local task=$1 epochs=3 extra=()
  [[ $task == sst2 ]] && epochs=1 && extra=(--config.train.eval_every_steps=500)
  # shellcheck disable=SC2046
  launch "$ROOT/$task/teacher" python -m mpqbert.main --config=configs/finetune.py \
    --workdir="$ROOT/$task/teacher" --config.task="$task" --config.data.glue_dir="$GLUE_DIR" \
    $(data_flags "$task") --config.train.num_epochs=$epochs --config.checkpoint.keep=1 \
    "${extra[@]}"
}

# quantized <config> <workdir> <task> <seed> [--config.x=y ...]: one compressed model
quantized() {
  local config=$1 workdir=$2 task=$3 seed=$4; shift 4
  # shellcheck disable=SC2046
  launch "$workdir" python -m mpqbert.main --config="configs/$config.py" --workdir="$workdir" \
    --config.task="$task" --config.data.glue_dir="$GLUE_DIR" --config.seed="$seed" \
    --config.teacher.workdir="$ROOT/$task/teacher" $(data_flags "$task") \
    --config.train.num_train_steps=400 --config.checkpoint.every_steps=100 \
    --config.checkpoint.keep=1 "$@"
}

# hessian_run <method> <column> <task> <seed>: the first run of a task measures, the rest reuse
hessian_run() {
  local method=$1 column=$2 task=$3 seed=$4 shared="$ROOT/$3/$1_sensitivity.json" reuse=()
  [[ -f $shared ]] && reuse=(--config.hessian.sensitivity_from="$shared")
  # shellcheck disable=SC2046
  quantized "$method" "$ROOT/$task/$method${column}_seed$seed" "$task" "$seed" \
    $(target_flags "$column" "$task") --config.hessian.batch_size=16 "${reuse[@]}"
  local measured="$ROOT/$task/$method${column}_seed$seed/sensitivity.json"
  if [[ ! -f $shared && -f $measured ]]; then cp "$measured" "$shared"; fi
}

declare -A teacher_listed=()
for cell in $CELLS; do
  task=${cell%%:*} column=${cell##*:}
  if [[ -n $TASKS && " $TASKS " != *" $task "* ]]; then continue; fi
  if [[ -z ${teacher_listed[$task]:-} ]]; then teacher_run "$task"; teacher_listed[$task]=1; fi
  for seed in $SEEDS; do
    for method in $METHODS; do
      case $method in
        uniform)
          for bits in $(uniform_bits "$column"); do
            quantized uniform "$ROOT/$task/uniform${bits}_seed$seed" "$task" "$seed" \
              --config.quant.bits="$bits"
          done ;;
        automp)
          # shellcheck disable=SC2046
          quantized automp "$ROOT/$task/automp${column}_seed$seed" "$task" "$seed" \
            $(target_flags "$column" "$task") --config.search.train_subset=4000 \
            --config.search.num_epochs=2.0 --config.search.warmup_epochs=0.2 \
            --config.search.tau_decay=2.0 ;;
        hawq) [[ $column == smx ]] || hessian_run hawq "$column" "$task" "$seed" ;;
        qbert)
          if [[ $column == 8 || $column == 12 ]]; then
            hessian_run qbert "$column" "$task" "$seed"
          fi ;;
        sensimix) [[ $column != smx ]] || sensimix_runs "$task" "$seed" ;;
        *) echo "unknown method $method (use uniform automp hawq qbert sensimix)" >&2; exit 2 ;;
      esac
    done
  done
done
