"""Every speculative config whose model is a Chimera draft runs on vLLM's EAGLE machinery.

vLLM's speculative methods are a fixed list, read in ``EngineArgs.create_speculative_config``
(the one place every config passes through: the command line, ``LLM()`` and the speculators
route). For a Chimera draft the replacement sets the method to ``eagle`` (vLLM's paged KV cache
for the draft, the target's hidden states), reads K (default: the draft's heads) and the prompt
lookup settings vLLM keeps for its n-gram method only, and checks the draft against the target
in the process that starts the engine, so that the error reaches the user. Any other config
passes through unchanged.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from chimera_vllm.config import CONFIG_NAME, SPECULATORS_MODEL_TYPE, ChimeraConfig, ChimeraConfigError
from chimera_vllm.vllm.patches import patch_once
from chimera_vllm.vllm.prompt_lookup import PromptLookup, draft_model_tokens


def local_file(model: str | None, name: str) -> Path | None:
    """A file of a local directory or of a model in the Hugging Face cache (never downloads)."""
    if not model:
        return None
    path = Path(model) / name
    if path.is_file():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, name)
    except ValueError:  # not a repository id
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_config_dict(model: str | None) -> dict[str, Any] | None:
    """config.json of a local directory or of a model in the Hugging Face cache (never downloads)."""
    path = local_file(model, CONFIG_NAME)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def chimera_draft_config(model: str | None) -> ChimeraConfig | None:
    """The Chimera config of a draft model, or None when model is not a Chimera draft."""
    d = read_config_dict(model)
    if d is None or d.get("speculators_model_type") != SPECULATORS_MODEL_TYPE:
        return None
    return ChimeraConfig.from_dict(d)


def speculative_method(method: str | None, model: str | None, is_chimera: bool) -> str | None:
    """The vLLM method for a speculative config: EAGLE's machinery for a Chimera draft."""
    if not is_chimera:
        if method == SPECULATORS_MODEL_TYPE:
            raise ChimeraConfigError(
                f"speculative method 'chimera' needs a Chimera draft as its model; {model!r} is not one "
                "(no config.json with speculators_model_type 'chimera' there)"
            )
        return method
    if method not in (None, SPECULATORS_MODEL_TYPE, "eagle"):
        raise ChimeraConfigError(
            f"{model} is a Chimera draft: leave the speculative method unset (or 'chimera'), got method={method!r}"
        )
    return "eagle"


def install() -> None:
    """Every speculative config (CLI, LLM(), speculators) becomes a SpeculativeConfig here."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        @functools.wraps(original)
        def create_speculative_config(self, target_model_config, target_parallel_config):
            spec = self.speculative_config if isinstance(self.speculative_config, dict) else {}
            spec = {key.replace("-", "_"): value for key, value in spec.items()}
            model = spec.get("model", self.spec_model)
            config = chimera_draft_config(model)
            if isinstance(self.speculative_config, dict):
                self.speculative_config = spec
            if spec and ("method" in spec or self.spec_method is None):
                self.speculative_config = {
                    **spec,
                    "method": speculative_method(spec.get("method"), model, config is not None),
                }
            else:
                self.spec_method = speculative_method(self.spec_method, model, config is not None)
            lookup = None
            if config is not None:
                if isinstance(self.speculative_config, dict):  # vLLM keeps these for its n-gram method only
                    lookup = PromptLookup.pop_from_spec(self.speculative_config)
                k = spec.get("num_speculative_tokens", self.spec_tokens)
                if k is None:  # default: one token per trained head
                    k = config.num_heads
                    if isinstance(self.speculative_config, dict):
                        self.speculative_config["num_speculative_tokens"] = k
                    else:
                        self.spec_tokens = k
                if lookup is not None:
                    lookup.check(k)
                _check_before_start(config, model, draft_model_tokens(lookup, k), target_model_config)
            speculative_config = original(self, target_model_config, target_parallel_config)
            if lookup is not None:
                lookup.attach(speculative_config.draft_model_config.hf_config)
            return speculative_config

        return create_speculative_config

    patch_once(EngineArgs, "create_speculative_config", make)


def _check_before_start(config: ChimeraConfig, model: str, num_speculative_tokens: int, target_model_config) -> None:
    """The draft/target checks and the draft's weights file (when it is here already: vLLM
    downloads it otherwise), in the process that starts the engine, so the error reaches the user."""
    from chimera_vllm.model.base import WEIGHTS_NAME, check_draft_file
    from chimera_vllm.vllm.model import check_draft_for_target

    try:
        check_draft_for_target(config, target_model_config.hf_config, num_speculative_tokens)
    except ChimeraConfigError as e:
        raise ChimeraConfigError(f"Chimera draft {model}: {e}") from e
    weights = local_file(model, WEIGHTS_NAME)
    if weights is not None:
        check_draft_file(weights, config)
