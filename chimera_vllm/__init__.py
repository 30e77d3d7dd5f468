"""Chimera speculative decoding (arXiv 2402.15758) for transformers and vLLM."""

from .config import ChimeraConfig, ChimeraConfigError, TargetSpec
from .model import ChimeraCheckpointError, ChimeraDraft, TargetParts

__all__ = [
    "ChimeraCheckpointError",
    "ChimeraConfig",
    "ChimeraConfigError",
    "ChimeraDraft",
    "TargetParts",
    "TargetSpec",
]
__version__ = "0.1.0"
