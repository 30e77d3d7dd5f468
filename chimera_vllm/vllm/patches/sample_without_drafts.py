"""Steps without drafts take vLLM's plain sampler, in a Chimera draft's engine on a CPU.

With a speculative config, vLLM's model runner sends every step through the rejection sampler,
also a step in which no request has a draft (a batch-size schedule's K = 0, or prompt lookup
finding no match): a copy of the logits, a second pass over them and the rejection bookkeeping.
Such a step, when no logprobs are asked for, samples here as a step without speculation does; what
it returns has the same shape, [batch, 1]. What it saves: docs/results/vllm-cpu.md.
"""

from __future__ import annotations

import functools

import torch

from chimera_vllm.vllm.patches import patch_instance


def sample_without_drafts(original):
    """The model runner's ``_sample``, taking vLLM's plain sampler for a step without draft tokens."""

    @functools.wraps(original)
    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata):
        if (
            spec_decode_metadata is not None
            and spec_decode_metadata.max_spec_len == 0
            and self.input_batch.sampling_metadata.max_num_logprobs is None
        ):
            spec_decode_metadata = None
        return original(self, logits, spec_decode_metadata)

    return _sample


def install_on(runner) -> None:
    """This Chimera engine's model runner only."""
    patch_instance(runner, "_sample", sample_without_drafts)
