"""The recovered tokens' noise at temperature > 0, in a Chimera draft's engine on a CPU.

At temperature > 0, vLLM's ``sample_recovered_tokens`` draws exponential noise over the whole
vocabulary for every request in the batch, drafts or not, with ``Tensor.exponential_``, which on a
CPU costs several times ``uniform_`` + ``log_``: with a batch-size schedule's K = 0 that made a step
slower than without speculation (docs/results/vllm-cpu.md). This version draws the same
distribution (-log U is exponential) only for the requests that have drafts.

The replacement of ``rejection_sampler.sample_recovered_tokens`` is inert until a Chimera engine's
rejection sampler turns it on for its own steps (:func:`for_chimera_steps`): vLLM's own methods
keep vLLM's sampling.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

from chimera_vllm.vllm.patches import patch_once

_chimera_step = threading.local()


def inverse_exponential_noise(
    num_draft_tokens: list[int],
    vocab_size: int,
    generators: dict[int, torch.Generator],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[batch, vocab] 1 / q with q ~ Exponential(1) for the requests that have draft tokens, 0 for
    the rest, which nothing reads. A request with its own generator (its own seed) gets vLLM's very
    draw, ``exponential_`` on that generator, so it samples the tokens stock vLLM gives it; the
    others get the same distribution as -log U from the global generator, cheaper on a CPU (vLLM
    draws theirs from the global generator too, so no seed ties them to a stream)."""
    inv_q = torch.zeros(len(num_draft_tokens), vocab_size, dtype=dtype, device=device)
    unseeded = [i for i, n in enumerate(num_draft_tokens) if n > 0 and i not in generators]
    if unseeded:
        inv_q[unseeded] = torch.empty(len(unseeded), vocab_size, dtype=dtype, device=device).uniform_()
    inv_q.log_().reciprocal_().neg_()  # 1 / (-log U); U = 0 gives 0 (q = inf), never drawn
    for i, generator in generators.items():  # vLLM's own draw, so a seeded request keeps vLLM's stream
        if num_draft_tokens[i] > 0:
            q = torch.empty(vocab_size, dtype=dtype, device=device).exponential_(generator=generator)
            inv_q[i] = q.reciprocal_()
    return inv_q


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


def chimera_steps_only(original: Callable) -> Callable:
    """The module's ``sample_recovered_tokens``: this project's inside a Chimera engine's step, else vLLM's."""

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        ours = getattr(_chimera_step, "active", False)
        return (sample_recovered_tokens if ours else original)(*args, **kwargs)

    return dispatch


def for_chimera_steps(forward: Callable) -> Callable:
    """A Chimera engine's rejection-sampler ``forward``, under which the dispatch above takes ours."""

    @functools.wraps(forward)
    def chimera_forward(self, *args, **kwargs):
        _chimera_step.active = True
        try:
            return forward(self, *args, **kwargs)
        finally:
            _chimera_step.active = False

    return chimera_forward


def install() -> None:
    from vllm.v1.sample import rejection_sampler

    patch_once(rejection_sampler, "sample_recovered_tokens", chimera_steps_only)
