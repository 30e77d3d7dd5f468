"""ChimeraProposer where vLLM's V1 model runner looks up ``EagleProposer``.

The runner builds its EAGLE proposer by this module-level name and offers no hook for another
proposer class. ChimeraProposer subclasses EagleProposer and runs vLLM's own code for any draft
that is not a Chimera draft.
"""

from __future__ import annotations


def install() -> None:
    from vllm.v1.worker import gpu_model_runner

    from chimera_vllm.vllm.proposer import ChimeraProposer

    if gpu_model_runner.EagleProposer is not ChimeraProposer:
        gpu_model_runner.EagleProposer = ChimeraProposer
