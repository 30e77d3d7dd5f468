#!/usr/bin/env bash
# On a lent GPU machine (the `device` tool), once the pieces scripts/device_pack.sh made have all
# travelled: install the carried wheels, run scripts/train_smollm2_gpu.sh (the target converted
# from the carried pieces, which fetch-target joins and checks) with the environment's knobs,
# stopped after BUDGET_S seconds, and put the draft folder in $OUT as a tar in pieces of at most
# 15 MiB beside the log (the tool returns at most 8 files of 16 MiB): the finished draft, or the
# last checkpoint's if the budget ran out, no optimizer state. Here, afterwards:
#   cat FILES_AT/draft.tar.part* | tar -xf - -C runs/
#
#   DRAFT_NAME=run8 INIT_DRAFT=... bash scripts/device_train.sh
#
# Knobs: scripts/train_smollm2_gpu.sh's, BUDGET_S (default 500), DEVICE_DIR (default .device).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT: the folder the device tool returns}"
dir=${DEVICE_DIR:-.device}
wheels=("$dir"/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        "${wheels[@]}" || exit
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The GPU machine runs the package from this copy of the tree, not installed: the top-level kernels/
# folder, which installs as chimera_vllm.kernels (setup.py), is then linked in its place.
"${PYTHON:-python3}" -c 'import importlib.metadata as m; m.version("chimera-vllm")' 2>/dev/null \
    || ln -sfn ../kernels chimera_vllm/kernels
export PYTHONUNBUFFERED=1
TARGET_GGUF=$(ls "$dir"/target*/piece 2>/dev/null | sort -V | tr '\n' ' ')
[ -n "$TARGET_GGUF" ] || { echo "no $dir/target*/piece here: carry scripts/device_pack.sh's pieces first" >&2; exit 1; }
export TARGET_GGUF RUN=${RUN:-/tmp/run} DRAFT_NAME=${DRAFT_NAME:-chimera}
timeout "${BUDGET_S:-500}" bash scripts/train_smollm2_gpu.sh 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "train_smollm2_gpu.sh exit status $status" | tee -a "$OUT/log.txt"
# The finished draft, or (stopped before the end) the last checkpoint's draft; no optimizer state.
skip=checkpoint
[ -f "$RUN/$DRAFT_NAME/model.safetensors" ] || skip='optimizer.*'
[ -d "$RUN/$DRAFT_NAME" ] && tar -C "$RUN" -cf - --exclude "$skip" "$DRAFT_NAME" | split -b 15M - "$OUT/draft.tar.part"
exit "$status"
