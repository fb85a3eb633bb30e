#!/usr/bin/env bash
# The accelerator checks in one command, for the first GPU (or TPU) host at hand:
#
#   bash experiments/accelerator_check.sh [RESULTS_DIR]
#
# 1. records the device (nvidia-smi, jax.devices()) in RESULTS_DIR/device.txt;
# 2. runs the kernel tests compiled (MPQBERT_KERNEL_BACKEND=triton on GPU, mosaic_tpu on TPU: the
#    whole correctness matrix of tests/test_kernels.py against float64 NumPy) and the export tests
#    (packed models through the compiled kernels against the fake-quantized model);
# 3. runs experiments/kernel_bench.py (XLA's int8 W8A8, packed 8/4/2-bit and XNOR against bf16
#    jnp.dot, M 1..512, BERT-base shapes and 4096x4096) -> RESULTS_DIR/kernel_bench.{md,csv};
# 4. runs experiments/bench_packed_inference.py on a random BERT-base-shaped model (float32,
#    bfloat16, uniform 8/4/2-bit and SensiMix packed models, each also laid out as int8; batch 1,
#    8, 32 at 128 tokens)
#    -> RESULTS_DIR/packed_inference_<backend>_bert_base_random.{md,json}.
#
# Each step has its own time limit, so one failure costs only its step; the summary at the end says
# which passed. Knobs (environment): TESTS, TESTS_LIMIT_S, BENCH_METHODS, BENCH_MS, BENCH_BUDGET_S,
# BENCH_LIMIT_S, INFERENCE_BATCHES, INFERENCE_LIMIT_S. At most ~10 min (limits 150 + 200 + 240 s); on one H200 the tests took 80-90 s and
# the packed-inference bench more than 140 s (mostly compilation). Needs the repository and
# JAX with CUDA, flax, optax, chex, orbax, absl-py, pytest (+ pytest-xdist); nothing is downloaded
# and no model files or data are read. ml-collections (imported by the export tests) may come as
# wheels in .whl/, installed here into /tmp/site; make them on a machine with a package index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections==1.1.0
# RESULTS_DIR defaults to experiments/results/accelerator_<device>.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # The benches import mpqbert from here.
export PYTHONUNBUFFERED=1
DEVICE=$($PY -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null | tail -1)
BACKEND=$($PY -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1)
SLUG=$(echo "${DEVICE:-unknown}" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
DIR=${1:-experiments/results/accelerator_$SLUG}
mkdir -p "$DIR"
declare -A STATUS

{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "device: $DEVICE ($BACKEND)"; nvidia-smi -L 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  $PY -c 'import jax, jaxlib, flax, optax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__,
"flax", flax.__version__, "optax", optax.__version__); print(jax.devices())'
} > "$DIR/device.txt" 2>&1
cat "$DIR/device.txt"

case $BACKEND in
  gpu) KERNEL=triton ;;
  tpu) KERNEL=mosaic_tpu ;;
  *) echo "no GPU/TPU (jax backend: $BACKEND): this script times kernels; run it on an accelerator."
     exit 2 ;;
esac

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to DIR/NAME.log.
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$DIR/$name.log"
  STATUS[$name]="rc=$rc in $((SECONDS - start)) s"
  echo "=== $name: ${STATUS[$name]}"
}

# Tests in 8 processes that share the GPU: no process takes most of its memory up front.
XLA_PYTHON_CLIENT_PREALLOCATE=false MPQBERT_KERNEL_BACKEND=$KERNEL \
  step tests "${TESTS_LIMIT_S:-150}" $PY -m pytest -v -p no:cacheprovider -n 8 \
  ${TESTS:-tests/test_kernels.py tests/test_export.py}
step kernel_bench "${BENCH_LIMIT_S:-200}" $PY experiments/kernel_bench.py \
  --shapes=4096x4096,768x768,768x3072,3072x768 --methods="${BENCH_METHODS:-bf16,int8,packed8,packed4,packed2,xnor,xnor+pack}" \
  --ms="${BENCH_MS:-1,8,32,128,512}" \
  --budget_s="${BENCH_BUDGET_S:-150}" --out="$DIR"
step packed_inference "${INFERENCE_LIMIT_S:-240}" $PY experiments/bench_packed_inference.py \
  --model=bert_base_random --batch_sizes="${INFERENCE_BATCHES:-1,8,32}" --seq_len=128 \
  --rounds=3 --repeats=3 --int8 \
  --out="$DIR/packed_inference_${BACKEND}_bert_base_random"

echo "=== summary ($DEVICE)"
for name in tests kernel_bench packed_inference; do echo "$name: ${STATUS[$name]:-not run}"; done \
  | tee "$DIR/summary.txt"
