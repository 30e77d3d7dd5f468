"""Chimera speculative decoding (arXiv 2402.15758) for transformers and vLLM."""

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError, TargetSpec
from chimera_vllm.model.base import ChimeraCheckpointError, DraftModel, TargetParts
from chimera_vllm.model.draft import ChimeraDraft
from chimera_vllm.model.medusa import MedusaDraft

__all__ = [
    "ChimeraCheckpointError",
    "ChimeraConfig",
    "ChimeraConfigError",
    "ChimeraDraft",
    "DraftModel",
    "MedusaDraft",
    "TargetParts",
    "TargetSpec",
]
__version__ = "0.1.0"
