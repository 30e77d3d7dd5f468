"""Prompt lookup beside the Chimera draft: where a request's own text already holds its next tokens.

Small models repeat themselves and answers quote their prompts: at a step where the
last 2..5 tokens occurred earlier in the request, the tokens that followed them there
are a free draft (vLLM's n-gram proposer, "prompt lookup"). With prompt lookup on, the
Chimera proposer drafts those where the lookup finds a match and runs the draft model
for the other requests; a batch where every request found one skips the draft model.

The lookup may draft more tokens than the draft model: vLLM's ``num_speculative_tokens``
bounds both, and ``chimera_num_speculative_tokens`` lowers the draft model's share, which
pays on a CPU, where verifying a token costs the target a few percent more per step and
every drafted token costs a draft-model step (docs/vllm-integration.md, "Prompt lookup").

vLLM keeps ``prompt_lookup_min``/``prompt_lookup_max`` for its n-gram method only, so the
plugin takes them out of a Chimera draft's speculative config and hands them to the
proposer on the draft's hf_config (:data:`HF_CONFIG_ATTR`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from chimera_vllm.config import ChimeraConfigError

HF_CONFIG_ATTR = "chimera_prompt_lookup"
"""Attribute of the draft's vLLM hf_config holding the :class:`PromptLookup` settings."""

DRAFT_TOKENS_KEY = "chimera_num_speculative_tokens"


@dataclass(frozen=True)
class PromptLookup:
    """Match the last min_n..max_n tokens (longest first); draft_tokens: the draft model's tokens per
    step where nothing matches (None: num_speculative_tokens)."""

    min_n: int
    max_n: int
    draft_tokens: int | None = None

    @classmethod
    def pop_from_spec(cls, spec: dict) -> PromptLookup | None:
        """Take the lookup keys out of a speculative config dict; None when prompt lookup is off."""
        min_n, max_n = spec.pop("prompt_lookup_min", None), spec.pop("prompt_lookup_max", None)
        draft_tokens = spec.pop(DRAFT_TOKENS_KEY, None)
        if min_n is None and max_n is None:
            if draft_tokens is not None:
                raise ChimeraConfigError(
                    f"{DRAFT_TOKENS_KEY}={draft_tokens} sets the draft model's share beside prompt lookup: "
                    "set prompt_lookup_min/prompt_lookup_max too, or num_speculative_tokens alone"
                )
            return None
        return cls(min_n if min_n is not None else max_n, max_n if max_n is not None else min_n, draft_tokens)

    def check(self, num_speculative_tokens: int) -> None:
        """Raise on a setting vLLM could not run, naming it."""
        for name, value in (("prompt_lookup_min", self.min_n), ("prompt_lookup_max", self.max_n)):
            if not isinstance(value, int) or value < 1:
                raise ChimeraConfigError(f"{name}={value!r}: use an integer >= 1")
        if self.min_n > self.max_n:
            raise ChimeraConfigError(f"prompt_lookup_min={self.min_n} is above prompt_lookup_max={self.max_n}")
        if self.draft_tokens is None:
            return
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ChimeraConfigError(f"{DRAFT_TOKENS_KEY}={self.draft_tokens!r}: use an integer >= 1")
        if self.draft_tokens > num_speculative_tokens:
            raise ChimeraConfigError(
                f"{DRAFT_TOKENS_KEY}={self.draft_tokens} is above num_speculative_tokens={num_speculative_tokens}, "
                "which bounds every draft"
            )

    def attach(self, hf_config) -> None:
        setattr(hf_config, HF_CONFIG_ATTR, asdict(self))

    @classmethod
    def of(cls, hf_config) -> PromptLookup | None:
        settings = getattr(hf_config, HF_CONFIG_ATTR, None)
        return None if settings is None else cls(**settings)

    def propose(self, contexts: np.ndarray, lengths: np.ndarray, k: int, max_model_len: int) -> list[list[int]]:
        """vLLM's n-gram match over each row's first lengths[i] tokens: up to k tokens each (none past
        max_model_len), [] where nothing matches."""
        from numba import get_num_threads, set_num_threads
        from vllm.v1.spec_decode.ngram_proposer import batch_propose_numba

        use_numba_workqueue()
        drafts = np.zeros((len(lengths), k), dtype=np.int32)
        num_drafts = np.zeros(len(lengths), dtype=np.int32)
        threads = get_num_threads()
        set_num_threads(1)  # as vLLM's n-gram proposer: a thread pool costs more than it saves here
        try:
            rows = np.arange(len(lengths))
            batch_propose_numba(rows, lengths, contexts, self.min_n, self.max_n, max_model_len, k, drafts, num_drafts)
        finally:
            set_num_threads(threads)
        return [drafts[i, :n].tolist() for i, n in enumerate(num_drafts)]


def use_numba_workqueue() -> None:
    """Run numba's parallel functions (vLLM's n-gram match) on numba's own thread pool, not OpenMP.

    Its default OpenMP layer, once the first match starts it in vLLM's CPU worker, slows every later
    step of the target there: batch 16 ran at 0.74-0.79x of no speculation with the lookup used only
    while one request ran, and at par with this pool (docs/vllm-integration.md). The match runs on
    one thread either way. Effective until numba first starts its threads in the process."""
    import numba

    numba.config.THREADING_LAYER = "workqueue"


def draft_model_tokens(lookup: PromptLookup | None, num_speculative_tokens: int) -> int:
    """The draft model's tokens per step when vLLM asks for num_speculative_tokens: all of them
    without prompt lookup, the lookup's draft_tokens share (at most all of them) with it."""
    if lookup is None or lookup.draft_tokens is None:
        return num_speculative_tokens
    return min(lookup.draft_tokens, num_speculative_tokens)


@dataclass(frozen=True)
class SimulatedStep:
    drafted: int  # tokens the target verified beside its own
    accepted: int
    draft_model_steps: int  # 0 where the lookup drafted


def simulate_greedy_steps(
    tokens: list[int],
    prompt_len: int,
    max_new_tokens: int,
    num_speculative_tokens: int,
    draft_model_accepts: Callable[[int, int], int] | None,
    lookup: PromptLookup | None = None,
    draft_model_length: Callable[[int, int], int] | None = None,
) -> list[SimulatedStep]:
    """The target steps of one request's greedy speculative decoding, from its known output.

    tokens: the prompt and the target's greedy continuation (to its end of sequence, or past
    max_new_tokens by k tokens for the last step's drafts); draft_model_accepts(n, s): how many
    of the s tokens the draft model drafts at anchor n (the newest verified position) the target
    keeps, or None for no draft model (vLLM's n-gram proposer alone). Greedy decoding keeps
    exactly the drafts that match the continuation, so this replays any drafting policy without
    running the target again: prompt lookup first where it matches, the draft model elsewhere,
    as :class:`chimera_vllm.vllm.proposer.ChimeraProposer` drafts. draft_model_length(n, s): how
    many of those s tokens the draft model keeps when it stops early (a minimum draft probability);
    it still ran the step of the first token it dropped.
    """
    k = num_speculative_tokens
    draft_k = draft_model_tokens(lookup, k)
    steps, n, produced = [], prompt_len - 1, 1  # the prefill produced the first token
    while produced < min(max_new_tokens, len(tokens) - prompt_len):
        found = [] if lookup is None else lookup.propose(np.array([tokens[: n + 2]]), np.array([n + 2]), k, 1 << 30)[0]
        if found:
            known = tokens[n + 2 : n + 2 + len(found)]
            accepted = next((i for i, (a, b) in enumerate(zip(found, known)) if a != b), len(known))
            step = SimulatedStep(len(found), accepted, 0)
        elif draft_model_accepts is None:
            step = SimulatedStep(0, 0, 0)
        else:
            kept = draft_k if draft_model_length is None else draft_model_length(n, draft_k)
            accepted = min(draft_model_accepts(n, draft_k), kept)
            step = SimulatedStep(kept, accepted, min(kept + 1, draft_k))
        steps.append(step)
        n += step.accepted + 1
        produced += step.accepted + 1
    return steps
