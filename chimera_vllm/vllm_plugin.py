"""vLLM plugin entry point (``vllm.general_plugins`` group, declared in setup.py).

vLLM calls :func:`register` in every process it starts. The Chimera draft
architecture is registered here by the vLLM integration; until that lands the
plugin only checks that the installed vLLM is a version the project supports.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32", "0.33")


def register() -> None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        logger.warning(
            "chimera_vllm supports vLLM %s; found %s: the Chimera draft is not registered",
            " and ".join(SUPPORTED_VLLM),
            vllm.__version__,
        )
