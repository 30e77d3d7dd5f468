"""The soak's traffic: a seeded list of OpenAI requests of every kind a server meets.

Chat and completion, streamed or not, greedy and sampled (with and without their own seed, ``n``
of 2), log-probabilities, structured outputs (a JSON schema, a regex), stop strings, prompts from
one token to near the context length (long ones are prefilled in chunks), streams the client
drops after a few chunks, and requests the server must refuse. The same seed gives the same list,
so that every server of a soak answers the same requests in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

REFUSALS = ("too_long", "bad_schema", "unknown_model", "logit_bias")
"""Requests a server must refuse; logit_bias only with speculation (vLLM refuses it for every method)."""

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 40}},
    "required": ["answer"],
    "additionalProperties": False,
}
BAD_SCHEMA = {"type": "object", "properties": {"answer": {"type": "no-such-type"}}}
ANSWER_REGEX = r"[a-z ]{1,30}\."
STOPS = (".", "\n", " the")
UNKNOWN_MODEL = "no-such-model"


@dataclass(frozen=True)
class Mix:
    """Shares of the traffic (each of the requests it applies to)."""

    chat: float = 0.5
    stream: float = 0.5
    sampled: float = 0.4
    seeded: float = 0.5  # of the sampled
    two_choices: float = 0.2  # of the sampled: n = 2
    logprobs: float = 0.2
    structured: float = 0.1
    stop: float = 0.15
    one_token: float = 0.05
    long: float = 0.1  # near the context length
    dropped: float = 0.1  # of the streams
    refused: float = 0.05


@dataclass(frozen=True)
class RequestSpec:
    """One request of the traffic. prompt: text (chat or completion) or token ids (completion)."""

    index: int
    chat: bool
    stream: bool
    prompt: str | list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    structured: str | None = None  # "json" or "regex"
    stop: str | None = None
    drop_after_chunks: int | None = None  # the client closes the stream after so many chunks
    refusal: str | None = None  # one of REFUSALS: the server must refuse it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def refused_by(self, speculative: bool) -> bool:
        """Whether a server (with or without speculation) must refuse this request."""
        return self.refusal is not None and (self.refusal != "logit_bias" or speculative)

    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, model: str) -> dict[str, Any]:
        """The JSON body of the request, sent to a server serving model."""
        body: dict[str, Any] = {
            "model": UNKNOWN_MODEL if self.refusal == "unknown_model" else model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "n": self.n,
            "stream": self.stream,
            "return_token_ids": True,
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.seed is not None:
            body["seed"] = self.seed
        if self.logprobs:
            body.update({"logprobs": True, "top_logprobs": 3} if self.chat else {"logprobs": 3})
        if self.stop is not None:
            body["stop"] = [self.stop]
        schema = BAD_SCHEMA if self.refusal == "bad_schema" else ANSWER_SCHEMA
        if self.structured == "json" or self.refusal == "bad_schema":
            body["structured_outputs"] = {"json": schema}
        elif self.structured == "regex":
            body["structured_outputs"] = {"regex": ANSWER_REGEX}
        if self.refusal == "logit_bias":
            body["logit_bias"] = {"5": 1.0}
        return body


@dataclass(frozen=True)
class PromptPool:
    """What the traffic draws its prompts from: texts, and token ids to cut prompts of any length from."""

    texts: list[str]
    token_ids: list[int]
    max_model_len: int

    def tokens(self, rng: random.Random, length: int) -> list[int]:
        start = rng.randrange(max(1, len(self.token_ids) - length))
        ids = self.token_ids[start : start + length]
        while len(ids) < length:  # a pool shorter than the prompt: round again
            ids += self.token_ids[: length - len(ids)]
        return ids


def make_traffic(
    pool: PromptPool, num_requests: int, seed: int = 0, mix: Mix = Mix(), max_tokens: int = 48
) -> list[RequestSpec]:
    """num_requests requests drawn with this seed (the same list for every server of a soak)."""
    rng = random.Random(seed)
    return [_request(i, rng, pool, mix, max_tokens) for i in range(num_requests)]


def _request(index: int, rng: random.Random, pool: PromptPool, mix: Mix, max_tokens: int) -> RequestSpec:
    new_tokens = rng.randint(max(1, max_tokens // 4), max_tokens)
    if rng.random() < mix.refused:
        return _refusal(index, rng, pool, new_tokens)
    chat = rng.random() < mix.chat
    stream = rng.random() < mix.stream
    sampled = rng.random() < mix.sampled
    spec = dict(
        index=index,
        chat=chat,
        stream=stream,
        prompt=rng.choice(pool.texts),
        max_tokens=new_tokens,
        logprobs=rng.random() < mix.logprobs,
        stop=rng.choice(STOPS) if rng.random() < mix.stop else None,
        structured=rng.choice(("json", "regex")) if rng.random() < mix.structured else None,
    )
    if sampled:
        spec.update(
            temperature=0.8,
            seed=rng.randrange(1 << 30) if rng.random() < mix.seeded else None,
            n=2 if rng.random() < mix.two_choices else 1,
        )
    if not chat:  # prompts of a given length are token ids: a completion's
        draw = rng.random()
        if draw < mix.one_token:
            spec["prompt"] = pool.tokens(rng, 1)
        elif draw < mix.one_token + mix.long:
            longest = pool.max_model_len - new_tokens - 1
            spec["prompt"] = pool.tokens(rng, rng.randint(longest * 3 // 4, longest))
    if stream and rng.random() < mix.dropped:
        spec["drop_after_chunks"] = rng.randint(1, 6)
    return RequestSpec(**spec)


def _refusal(index: int, rng: random.Random, pool: PromptPool, new_tokens: int) -> RequestSpec:
    refusal = rng.choice(REFUSALS)
    prompt: str | list[int] = rng.choice(pool.texts)
    chat = rng.random() < 0.5
    if refusal == "too_long":
        chat, prompt = False, pool.tokens(rng, pool.max_model_len + rng.randint(1, 64))
    return RequestSpec(
        index=index, chat=chat, stream=rng.random() < 0.5, prompt=prompt, max_tokens=new_tokens, refusal=refusal
    )
