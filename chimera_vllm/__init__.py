"""Chimera speculative decoding (arXiv 2402.15758) for transformers and vLLM."""

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError, TargetSpec
from chimera_vllm.model.draft import ChimeraCheckpointError, ChimeraDraft, TargetParts

__all__ = [
    "ChimeraCheckpointError",
    "ChimeraConfig",
    "ChimeraConfigError",
    "ChimeraDraft",
    "TargetParts",
    "TargetSpec",
]
__version__ = "0.1.0"
