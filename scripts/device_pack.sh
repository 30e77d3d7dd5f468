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
# Knobs (environment): PIECE_MIB (default: what fits beside the working tree, at most 30).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
gguf=$("$py" -c 'from chimera_vllm.fetch import PACKAGED_TARGETS, locate_pieces
print(*locate_pieces(PACKAGED_TARGETS["smollm2-135m"]))')
tree_mib=$(( ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) >> 20) + 1 ))
PIECE_MIB=${PIECE_MIB:-$(( (62 - tree_mib) < 30 ? 62 - tree_mib : 30 ))}
if [ "$PIECE_MIB" -lt 4 ]; then
    echo "the working tree takes ${tree_mib} MiB of the 64 a call carries: no room for the target's pieces" >&2
    exit 1
fi
rm -rf .device/target* .device/wheels
mkdir -p .device/wheels
size=$(stat -c %s "$gguf")
count=$(( (size + (PIECE_MIB << 20) - 1) / (PIECE_MIB << 20) ))
split -n "$count" -d -a 1 "$gguf" .device/piece  # equal pieces: the most room beside the tree
n=0
for piece in .device/piece*; do
    n=$((n + 1))
    mkdir -p ".device/target$n"
    mv "$piece" ".device/target$n/piece"
done
"$py" -m pip download -q --no-deps --only-binary=:all: -d .device/wheels "gguf==$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
echo "working tree ${tree_mib} MiB; $gguf in $n pieces:"
ls -l .device/target*/piece .device/wheels
echo "device calls, in a row: carry .device/target1 .. .device/target$((n - 1)) one a call (command: ls -l .device),"
echo "then the training call with carry [.device/target$n, .device/wheels] running scripts/device_train.sh"
