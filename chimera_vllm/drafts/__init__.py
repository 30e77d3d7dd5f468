"""Drafts shipped with the package: bf16 weights and a model card per directory (Chimera drafts, and
the baselines they are compared with in vLLM's own formats).

Any ``--draft`` of the CLI accepts a shipped draft's name as well as a path;
``chimera-vllm drafts`` prints each name, its target and its directory (what vLLM's
``--speculative-config '{"model": ...}'`` wants).
"""

from __future__ import annotations

import json
from pathlib import Path

DRAFTS_DIR = Path(__file__).parent


def shipped_drafts() -> dict[str, Path]:
    """Name -> directory of every shipped draft (a subdirectory with a config.json)."""
    return {p.name: p for p in sorted(DRAFTS_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_draft(name_or_path: str) -> str:
    """The directory of a shipped draft called name_or_path, else name_or_path unchanged."""
    if Path(name_or_path).exists():
        return name_or_path
    found = shipped_drafts().get(name_or_path)
    return str(found) if found else name_or_path


def describe_shipped_drafts() -> list[tuple[str, str, str, Path]]:
    """(name, kind, target it was trained for, directory) of every shipped draft: Chimera drafts and
    the baselines in vLLM's formats (their speculators config names the verifier too)."""
    described = []
    for name, path in shipped_drafts().items():
        config = json.loads((path / "config.json").read_text())
        kind = config.get("speculators_model_type", config.get("model_type", "?"))
        verifier = config.get("speculators_config", {}).get("verifier", {}).get("name_or_path", "?")
        described.append((name, kind, verifier, path))
    return described
