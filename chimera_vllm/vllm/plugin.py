"""vLLM plugin entry point (``vllm.general_plugins`` group, declared in setup.py).

vLLM calls :func:`register` in every process it starts. Through vLLM's public hooks it
registers the model class (architecture ``ChimeraDraftModel`` -> ``ChimeraDraftForVLLM``)
and the speculators type ``chimera`` (so that vLLM reads a Chimera draft's config.json and
``vllm serve DRAFT_DIR`` serves its verifier with it); then it installs the changes to vLLM
internals that have no hook, each listed with its reason in :mod:`chimera_vllm.vllm.patches`.
"""

from __future__ import annotations

import logging

from chimera_vllm.config import (
    DRAFT_ARCHITECTURE,
    SPECULATORS_MODEL_TYPE,
    ChimeraConfig,
)
from chimera_vllm.vllm.patches import CHECKED_VLLM, install_all

logger = logging.getLogger(__name__)


def register() -> None:
    import vllm

    if not vllm.__version__.startswith(CHECKED_VLLM):
        logger.warning(
            "chimera_vllm supports vLLM %s; found %s: the Chimera draft is not registered",
            " and ".join(CHECKED_VLLM),
            vllm.__version__,
        )
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(DRAFT_ARCHITECTURE, "chimera_vllm.vllm.model:ChimeraDraftForVLLM")
    _register_speculators_type()
    install_all()


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
