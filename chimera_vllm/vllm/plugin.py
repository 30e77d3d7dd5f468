"""vLLM plugin entry point (``vllm.general_plugins`` group, declared in setup.py).

vLLM calls :func:`register` in every process it starts. Through vLLM's public hooks it
registers the model class (architecture ``ChimeraDraftModel`` -> ``ChimeraDraftForVLLM``)
and the speculators type ``chimera`` (so that vLLM reads a Chimera draft's config.json and
``vllm serve DRAFT_DIR`` serves its verifier with it); then it installs the changes to vLLM
internals that have no hook, each listed with its reason in :mod:`chimera_vllm.vllm.patches`.
The functions below that those patches name are the ones that concern the plugin's own routing.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from chimera_vllm.config import (
    CONFIG_NAME,
    DRAFT_ARCHITECTURE,
    SPECULATORS_MODEL_TYPE,
    ChimeraConfig,
    ChimeraConfigError,
)
from chimera_vllm.vllm.patches import CHECKED_VLLM, install_all, patch_once
from chimera_vllm.vllm.prompt_lookup import PromptLookup, draft_model_tokens

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = CHECKED_VLLM


def register() -> None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        logger.warning(
            "chimera_vllm supports vLLM %s; found %s: the Chimera draft is not registered",
            " and ".join(SUPPORTED_VLLM),
            vllm.__version__,
        )
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(DRAFT_ARCHITECTURE, "chimera_vllm.vllm.model:ChimeraDraftForVLLM")
    _register_speculators_type()
    install_all()


def read_config_dict(model: str | None) -> dict[str, Any] | None:
    """config.json of a local directory or of a model in the Hugging Face cache (never downloads)."""
    if not model:
        return None
    path = Path(model) / CONFIG_NAME
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, CONFIG_NAME)
        except ValueError:  # not a repository id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
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


def _update_chimera(config_dict: dict, pre_trained_config: dict) -> None:
    """Speculators hook: the draft's vLLM hf_config carries its architecture and whole config."""
    from chimera_vllm.vllm.model import CHIMERA_CONFIG_KEY

    config = ChimeraConfig.from_dict(config_dict)  # a malformed config fails here, naming the field
    pre_trained_config["architectures"] = [DRAFT_ARCHITECTURE]
    # A fresh dict: pre_trained_config is config_dict's own transformer_layer_config, and a cycle
    # would break vLLM's config hashing (torch.compile's cache key).
    pre_trained_config[CHIMERA_CONFIG_KEY] = config.to_dict()


def _register_speculators_type() -> None:
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES, register_speculator

    if SPECULATORS_MODEL_TYPE not in SUPPORTED_SPECULATORS_TYPES:
        register_speculator(SPECULATORS_MODEL_TYPE)(_update_chimera)


def route_chimera_drafts_to_eagle() -> None:
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
                _check_before_start(config, draft_model_tokens(lookup, k), target_model_config)
            speculative_config = original(self, target_model_config, target_parallel_config)
            if lookup is not None:
                lookup.attach(speculative_config.draft_model_config.hf_config)
            return speculative_config

        return create_speculative_config

    patch_once(EngineArgs, "create_speculative_config", make)


def _check_before_start(config: ChimeraConfig, num_speculative_tokens: int, target_model_config) -> None:
    """The draft/target checks, in the process that starts the engine, so the error reaches the user."""
    from chimera_vllm.vllm.model import check_draft_for_target

    check_draft_for_target(config, target_model_config.hf_config, num_speculative_tokens)


def install_proposer() -> None:
    from vllm.v1.worker import gpu_model_runner

    from chimera_vllm.vllm.proposer import ChimeraProposer

    if gpu_model_runner.EagleProposer is not ChimeraProposer:
        gpu_model_runner.EagleProposer = ChimeraProposer


def keep_v1_model_runner() -> None:
    """Model Runner V2 has its own speculators and no place for Chimera's: use V1 with a Chimera draft."""
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
