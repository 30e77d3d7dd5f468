"""Replacing a vLLM function once per process, however often the plugin is registered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_PATCHED = "_chimera_vllm_patched"


def patch_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """owner.name = make(owner.name), unless it is already one of this project's replacements."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    patched = make(original)
    setattr(patched, _PATCHED, True)
    setattr(owner, name, patched)
