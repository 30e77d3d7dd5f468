"""The speculative methods a benchmark or a server runs, as text (``chimera:2@4``) and as vLLM configs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from chimera_vllm.vllm.engine import NGRAM_LOOKUP, builtin_draft_spec, chimera_spec, ngram_spec
from chimera_vllm.vllm.prompt_lookup import DRAFT_TOKENS_KEY

HYBRID = "chimera+ngram"
METHODS = ("none", "ngram", "suffix", "chimera", "medusa", "eagle3", "hf", HYBRID)
BUILTIN_DRAFTS = ("medusa", "eagle3")
"""Methods whose draft vLLM runs with its own code, from the export of a baseline draft."""
ANY_BATCH = 1 << 20
"""The last batch size of a schedule's open-ended range (vLLM clips it to max_num_seqs)."""


@dataclass(frozen=True)
class Method:
    """A proposer: "none", or "ngram"/"chimera"/"medusa"/"eagle3" (vLLM's) with K tokens per step ("chimera:4"),
    or "suffix" (vLLM's suffix decoding, model-free; "suffix:K" caps its drafts at K tokens, vLLM's
    default is its tree depth, 24).

    "chimera+ngram:K:D" is the Chimera draft with prompt lookup beside it: the lookup's
    drafts where it finds a match (up to K tokens), D tokens of the draft model elsewhere
    ("chimera+ngram:K" for D = K). A "@N" suffix on a Chimera method ("chimera:2@4") speculates
    only while at most N requests run (vLLM's batch-size schedule, K = 0 above; what
    ``chimera-vllm serve --max-speculative-batch N`` runs). "hf" is an outside baseline, not a vLLM engine:
    transformers' ``generate``, one request at a time (what a single-user CPU setup might
    run instead of vLLM).
    """

    name: str
    k: int = 0
    # vLLM's num_speculative_tokens_per_batch_size: (first, last batch size, K) ranges; k is their max
    schedule: tuple[tuple[int, int, int], ...] | None = None
    draft_k: int | None = None  # chimera+ngram: the draft model's tokens per step

    @classmethod
    def parse(cls, text: str) -> Method:
        method, at, max_batch = text.partition("@")
        name, _, rest = method.partition(":")
        k, _, draft_k = rest.partition(":")
        takes_k = {"none": False, "hf": False, "suffix": k != ""}.get(name, True)
        valid = (
            name in METHODS
            and takes_k == (k != "")
            and (draft_k == "" or name == HYBRID)
            and all(part.isdigit() for part in (k, draft_k) if part)
            and (not at or (name in ("chimera", HYBRID) and max_batch.isdigit() and int(max_batch) > 0))
        )
        if not valid:
            raise ValueError(
                f"method {text!r}: use none, hf, ngram:K, suffix[:K], chimera:K, chimera+ngram:K[:D], medusa:K or "
                "eagle3:K; "
                "chimera methods take @N to speculate only while at most N (>= 1) requests run"
            )
        method = cls(name, int(k) if k else 0, draft_k=int(draft_k) if draft_k else None)
        return method.up_to_batch(int(max_batch)) if at else method

    @classmethod
    def chimera(cls, draft_tokens: int, lookup_tokens: int = 0, max_batch: int | None = None) -> Method:
        """The Chimera draft's D tokens a step, with prompt lookup's up to L beside it when L > 0
        (the lookup drafts at least the draft model's share: K = max(L, D)); with max_batch, only
        while at most that many requests run (vLLM's batch-size schedule, K = 0 above)."""
        if lookup_tokens < 0:
            raise ValueError(f"--lookup-tokens must be 0 (off) or more, got {lookup_tokens}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"--max-speculative-batch must be 1 or more, got {max_batch}")
        k = max(lookup_tokens, draft_tokens)
        method = cls("chimera", k) if lookup_tokens == 0 else cls(HYBRID, k, draft_k=draft_tokens)
        return method if max_batch is None else method.up_to_batch(max_batch)

    def up_to_batch(self, max_batch: int) -> Method:
        """This method while at most max_batch requests run, no speculation above."""
        return replace(self, schedule=((1, max_batch, self.k), (max_batch + 1, ANY_BATCH, 0)))

    def __str__(self) -> str:
        if self.name == HYBRID:
            text = f"{self.name}:{self.k}" + (f":{self.draft_k}" if self.draft_k is not None else "")
        else:
            text = f"{self.name}:{self.k}" if self.k else self.name
        if self.schedule is None:
            return text
        max_batch = self.max_speculative_batch()
        if max_batch is not None:
            return f"{text}@{max_batch}"
        return f"{text}:auto" if self.name == HYBRID else f"{self.name}:auto"

    def max_speculative_batch(self) -> int | None:
        """N where the schedule is K up to N requests and off above (up_to_batch's), else None;
        such a schedule prints as "@N" whether given or tuned, others as ":auto"."""
        if self.schedule is not None and self.schedule == self.up_to_batch(self.schedule[0][1]).schedule:
            return self.schedule[0][1]
        return None

    def spec(self, drafts: dict[str, str | None]) -> dict | None:
        """vLLM's speculative config; drafts maps "chimera"/"medusa"/"eagle3" to their directories."""
        if self.name == "ngram":
            return ngram_spec(self.k)
        if self.name == "suffix":
            return {"method": "suffix", **({"num_speculative_tokens": self.k} if self.k else {})}
        if self.name in ("chimera", *BUILTIN_DRAFTS, HYBRID):
            kind = self.name if self.name in BUILTIN_DRAFTS else "chimera"
            path = drafts.get(kind)
            if path is None:
                raise ValueError(f"the {self.name} method needs --{'draft' if kind == 'chimera' else kind}")
            if kind in BUILTIN_DRAFTS:
                return builtin_draft_spec(kind, path, self.k)
            extra = {}
            if self.schedule:
                extra["num_speculative_tokens_per_batch_size"] = [list(e) for e in self.schedule]
            if self.name == HYBRID:
                extra.update(NGRAM_LOOKUP, **({DRAFT_TOKENS_KEY: self.draft_k} if self.draft_k else {}))
            return chimera_spec(path, self.k, **extra)
        return None


def parse_methods(texts: list[str]) -> list[Method]:
    """The methods of a --methods list, each once (a second engine of the same method would only
    overwrite the first one's row or trace)."""
    methods = [Method.parse(text) for text in texts]
    for i, (text, method) in enumerate(zip(texts, methods)):
        if method in methods[:i]:
            raise ValueError(f"method {text!r} is listed twice in --methods")
    return methods
