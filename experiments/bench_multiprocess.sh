#!/usr/bin/env bash
# The quickstart configuration at a small budget as 1 process and as one job of 2 processes on
# this machine (JAX's multi-controller runtime, a coordinator on localhost, gloo collectives):
# wall time of each and the equality of their results. On one 2-core machine this measures the
# overhead of several processes, not a speed-up.
#
#   bash experiments/bench_multiprocess.sh   # -> experiments/results/multiprocess_cpu.md
#
# Environment: ROOT (workdirs/bench_multiprocess), GLUE_DIR (../shared/data/glue).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-workdirs/bench_multiprocess}
GLUE_DIR=${GLUE_DIR:-../shared/data/glue}
OUT=experiments/results/multiprocess_cpu.md
FLAGS=(--config=configs/quickstart.py "--config.data.glue_dir=$GLUE_DIR"
       --config.data.train_subset=640 --config.teacher.train.num_train_steps=20
       --config.search.num_train_steps=20 --config.train.num_train_steps=20
       --config.checkpoint.every_steps=10 --config.data.shards=2)  # one data order for both
rm -rf "$ROOT"
mkdir -p "$ROOT"

job() {  # job <name> <processes>: the same command once per process; prints its wall seconds
  local name=$1 processes=$2 port start
  port=$(python -c "import socket; s = socket.socket(); s.bind(('localhost', 0)); print(s.getsockname()[1])")
  start=$(date +%s.%N)
  for ((i = 0; i < processes; i++)); do
    if ((processes > 1)); then
      env JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="localhost:$port" \
        JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" \
        python -m mpqbert.main "${FLAGS[@]}" --workdir="$ROOT/$name" > "$ROOT/$name.$i.log" 2>&1 &
    else
      env JAX_PLATFORMS=cpu python -m mpqbert.main "${FLAGS[@]}" --workdir="$ROOT/$name" \
        > "$ROOT/$name.$i.log" 2>&1 &
    fi
  done
  wait
  python -c "import time; print(f'{time.time() - $start:.0f}')"
}

one=$(job one_process 1)
two=$(job two_processes 2)
python - "$ROOT" "$one" "$two" "$OUT" "${FLAGS[*]}" <<'EOF'
import json, subprocess, sys
from pathlib import Path
root, one, two, out, flags = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
a, b = (json.loads((root / n / "results.json").read_text()) for n in ("one_process", "two_processes"))

def train_losses(name, stage):
  rows = [json.loads(l) for l in (root / name / stage / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"]

loss_gap = max(abs(x - y) / abs(x) for stage in ("teacher", "search", "retrain")
               for x, y in zip(train_losses("one_process", stage), train_losses("two_processes", stage),
                               strict=True))
commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
Path(out).write_text(
    "Several processes on one machine: the quickstart configuration at a small budget (20 steps\n"
    "per stage, 640 training examples) as 1 process and as one job of 2 processes (each 1 CPU\n"
    "device; coordinator on localhost, gloo collectives), on this project's 2-core CPU, with\n"
    "`data.shards=2` in both (one data order): each process of the job tokenizes its half of the\n"
    "training examples. Two processes share the same 2 cores, so this measures the overhead of\n"
    "the multi-process runtime (collectives between processes, one compilation per process), not\n"
    "a speed-up. One device against two sums each batch's gradients in another order, so the\n"
    "runs agree to float rounding, not bit for bit (tests/test_multiprocess.py compares equal\n"
    "device counts, 1 x 4 against 2 x 2).\n\n"
    "| job | wall time (s) | ratio | dev accuracy | size_mb |\n|---|---:|---:|---:|---:|\n"
    f"| 1 process | {one:.0f} | 1.00x | {a['dev']:.4f} | {a['size_mb']:.4f} |\n"
    f"| 2 processes | {two:.0f} | {two / one:.2f}x | {b['dev']:.4f} | {b['size_mb']:.4f} |\n\n"
    f"Same dev accuracy and size: {a['dev'] == b['dev'] and a['size_mb'] == b['size_mb']} "
    f"(dev difference {b['dev'] - a['dev']:+.6f}); logged training losses agree to "
    f"{loss_gap:.1e} relative (one device against two). "
    f"Commit {commit}. Command: "
    "`bash experiments/bench_multiprocess.sh` (flags: `" + flags + "`).\n")
print(Path(out).read_text())
EOF
