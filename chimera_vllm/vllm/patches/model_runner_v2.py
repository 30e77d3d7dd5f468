"""A Chimera draft keeps vLLM's V1 model runner.

Model Runner V2 has its own speculators and no place for an outside proposer; vLLM falls back to
V1 for any feature V2 lists as unsupported, and this adds "Chimera drafts" to that list when the
config carries one (vLLM logs the fallback).
"""

from __future__ import annotations

import functools

from chimera_vllm.vllm.patches import patch_once


def install() -> None:
    from vllm.config import VllmConfig

    from chimera_vllm.vllm.proposer import is_chimera_vllm_config

    def make(original):
        @functools.wraps(original)
        def unsupported(self):
            features = original(self)
            if is_chimera_vllm_config(self):
                features.append("Chimera drafts")
            return features

        return unsupported

    patch_once(VllmConfig, "_get_v2_model_runner_unsupported_features", make)
