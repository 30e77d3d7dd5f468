"""Drafts that misbehave, made from a good one.

Two that an engine must serve without changing a token: every weight NaN, and every weight
random (at each tensor's own scale). Three that it must refuse at start-up, naming the file and
the value: the weights file cut in half, a config for another target, and a draft vocabulary
holding an id outside the target's vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chimera_vllm.config import CONFIG_NAME
from chimera_vllm.model.base import WEIGHTS_NAME

SERVED = ("nan", "random")
REFUSED = ("truncated", "other_target", "vocab_out_of_range")


def make_faulty_drafts(draft_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Every faulty draft (SERVED + REFUSED) as a directory under out_dir, by name."""
    out_dir = Path(out_dir)
    made = {}
    for name in (*SERVED, *REFUSED):
        made[name] = out_dir / name
        shutil.rmtree(made[name], ignore_errors=True)
        shutil.copytree(draft_dir, made[name])
        _DAMAGE[name](made[name])
    return made


def _weights(directory: Path) -> Path:
    return directory / WEIGHTS_NAME


def _change_weights(directory: Path, change) -> None:
    state = load_file(_weights(directory))
    save_file({name: change(name, t) for name, t in state.items()}, _weights(directory), metadata={"format": "pt"})


def _nan(directory: Path) -> None:
    _change_weights(directory, lambda name, t: t if name == "draft_vocab" else torch.full_like(t, float("nan")))


def _random(directory: Path) -> None:
    g = torch.Generator().manual_seed(0)

    def randomise(name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "draft_vocab":
            return t
        scale = t.float().std().nan_to_num(0.02).clamp(min=1e-3)
        return (torch.randn(t.shape, generator=g) * scale).to(t.dtype)

    _change_weights(directory, randomise)


def _truncated(directory: Path) -> None:
    data = _weights(directory).read_bytes()
    _weights(directory).write_bytes(data[: len(data) // 2])


def _other_target(directory: Path) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config["target"]["hidden_size"] *= 2  # a target twice as wide
    path.write_text(json.dumps(config, indent=1))


def _vocab_out_of_range(directory: Path) -> None:
    """The draft vocabulary's last id one past the target's vocabulary (a draft over the whole
    vocabulary gets a draft vocabulary of every id, the last one past the end)."""
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    vocab_size = config["target"]["vocab_size"]
    state = load_file(_weights(directory))
    if "draft_vocab" not in state:
        state["draft_vocab"] = torch.arange(vocab_size)
        config["chimera"]["draft_vocab_size"] = vocab_size
        path.write_text(json.dumps(config, indent=1))
    state["draft_vocab"][-1] = vocab_size
    save_file(state, _weights(directory), metadata={"format": "pt"})


_DAMAGE = {
    "nan": _nan,
    "random": _random,
    "truncated": _truncated,
    "other_target": _other_target,
    "vocab_out_of_range": _vocab_out_of_range,
}
