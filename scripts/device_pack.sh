#!/usr/bin/env bash
# Pack, into .device/ (git-ignored), what a training run on a lent GPU machine (the `device` tool)
# needs beside the working tree, which travels with every call: the target's GGUF in pieces, each
# small enough to travel in one call beside the repo (a call carries at most 64 MiB in all), and
# the wheel of the `gguf` package that the conversion needs (that machine reaches no registry).
#
#   bash scripts/device_pack.sh
#
# Then one call per piece (`carry: [".device/targetN"]`; a warm machine keeps what earlier calls
# carried) and the training call, which carries the last piece and the wheels and runs
# scripts/device_train.sh: docs/training-smollm2.md, "On a lent GPU machine", has the calls.
# Training data made here (make-data --out $DEVICE_DIR/answers/NAME.jsonl) is gzipped into
# $DEVICE_DIR/data (about a sixth of its size), which travels in a call of its own; the script checks
# that it fits and prints the training call's BASE_DATA.
# Knobs (environment): PIECE_MIB (default: what fits beside the working tree, at most 30),
# DEVICE_DIR (default .device), DOWNLOAD_WHEELS (0: no wheel), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dir=${DEVICE_DIR:-.device}
gguf=$("$py" -c 'from chimera_vllm.reference.fetch import PACKAGED_TARGETS, locate_pieces
print(*locate_pieces(PACKAGED_TARGETS["smollm2-135m"]))')
mib() { awk '{s += $1} END {print int((s + 1048575) / 1048576)}'; }  # bytes, one figure a line: MiB rounded up
tree_mib=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1 | mib)  # what travels
PIECE_MIB=${PIECE_MIB:-$(( (62 - tree_mib) < 30 ? 62 - tree_mib : 30 ))}
if [ "$PIECE_MIB" -lt 4 ]; then
    echo "the working tree takes ${tree_mib} MiB of the 64 a call carries: no room for the target's pieces" >&2
    exit 1
fi
for answers in "$dir"/answers/*.jsonl; do  # made here: gzipped once, again only when they change
    [ -f "$answers" ] || continue
    packed=$dir/data/$(basename "$answers").gz
    if [ ! "$packed" -nt "$answers" ]; then
        mkdir -p "$dir/data"
        gzip -nc "$answers" > "$packed.tmp"
        mv "$packed.tmp" "$packed"
    fi
done
data_mib=0  # training data made here (BASE_DATA): one call of its own
[ -d "$dir/data" ] && data_mib=$(find "$dir/data" -type f -printf '%s\n' | mib)
if [ $((tree_mib + data_mib)) -gt 62 ]; then
    echo "$dir/data (${data_mib} MiB) does not fit beside the working tree (${tree_mib} MiB) in one call: split it" >&2
    exit 1
fi
rm -rf "$dir"/target* "$dir/wheels"
mkdir -p "$dir/wheels"
size=$(stat -c %s "$gguf")
count=$(( (size + (PIECE_MIB << 20) - 1) / (PIECE_MIB << 20) ))
split -n "$count" -d -a 2 "$gguf" "$dir/piece"  # equal pieces: the most room beside the tree
for i in $(seq "$count"); do
    mkdir -p "$dir/target$i"
    mv "$dir/piece$(printf %02d $((i - 1)))" "$dir/target$i/piece"
done
if [ "${DOWNLOAD_WHEELS:-1}" = 1 ]; then
    version=$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheels" "gguf==$version"
fi
echo "working tree ${tree_mib} MiB; $gguf in $count pieces:"
ls -l "$dir"/target*/piece "$dir/wheels"
echo "device calls, in a row: carry $dir/target1 .. $dir/target$((count - 1)) one a call (command: ls -l $dir),"
if [ "$data_mib" -gt 0 ]; then
    echo "carry $dir/data (${data_mib} MiB) in one call of its own,"
    echo "BASE_DATA=\"$(find "$dir/data" -type f | sort | tr '\n' ' ' | sed 's/ $//')\" in the training call,"
fi
echo "then the training call with carry [$dir/target$count, $dir/wheels] running scripts/device_train.sh"
