"""The soak's client: sends a request of the traffic and says what became of it.

Streams are read chunk by chunk, so that the client can go away in the middle of one as a user
closing a tab does (the server must abort the request and free its KV blocks). Every outcome is one
of :data:`OUTCOMES`; only ``unexpected`` and ``server_error`` are failures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

from chimera_vllm.bench.soak.traffic import RequestSpec

OUTCOMES = ("completed", "dropped", "refused", "unexpected", "server_error")


@dataclass
class Outcome:
    """What became of one request: its outcome, the status, and for a completed one each choice's
    token ids, text and finish reason (by choice index)."""

    index: int
    outcome: str
    status: int | None = None
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    error: str | None = None


async def send(client: httpx.AsyncClient, spec: RequestSpec, model: str, speculative: bool) -> Outcome:
    """Send spec to the server of client (its base URL) serving model; never raises for what the
    server does (a connection lost counts as unexpected, with its error)."""
    try:
        async with client.stream("POST", spec.endpoint(), json=spec.body(model)) as response:
            if response.status_code >= 400:
                await response.aread()
                return _error(spec, speculative, response.status_code, response.text)
            if spec.stream:
                result = await _read_stream(response, spec, speculative)
            else:
                await response.aread()
                result = _read_body(response.json(), spec)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Outcome(spec.index, "unexpected", error=f"{type(e).__name__}: {e}")
    if result.outcome in ("completed", "dropped") and spec.refused_by(speculative):
        return Outcome(
            spec.index, "unexpected", 200, error=f"the server accepted a request it must refuse ({spec.refusal})"
        )
    return result


def _error(spec: RequestSpec, speculative: bool, status: int, text: str) -> Outcome:
    """An answer with an error status (or a stream's error event with its code)."""
    if status >= 500:
        outcome = "server_error"
    else:
        outcome = "refused" if spec.refused_by(speculative) else "unexpected"
    return Outcome(spec.index, outcome, status, error=text[:500])


async def _read_stream(response: httpx.Response, spec: RequestSpec, speculative: bool) -> Outcome:
    """A stream's chunks; an error event (vLLM sends some refusals so, after a 200) counts as its code."""
    out = Outcome(spec.index, "completed", response.status_code)
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return out
        chunk = json.loads(data)
        if "error" in chunk:
            return _error(spec, speculative, int(chunk["error"].get("code") or 500), data)
        for choice in chunk.get("choices", []):
            _add(out, choice, spec.chat)
        chunks += 1
        if spec.drop_after_chunks is not None and chunks >= spec.drop_after_chunks:
            return Outcome(spec.index, "dropped", response.status_code)  # leaving the block closes the stream
    return Outcome(spec.index, "unexpected", response.status_code, error="the stream ended without [DONE]")


def _read_body(body: dict, spec: RequestSpec) -> Outcome:
    out = Outcome(spec.index, "completed", 200)
    for choice in body["choices"]:
        _add(out, choice, spec.chat)
    return out


def _add(out: Outcome, choice: dict, chat: bool) -> None:
    """Append a choice (a whole one or a stream's delta) to out."""
    i = choice["index"]
    if chat:
        text = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    out.texts[i] = out.texts.get(i, "") + text
    out.token_ids.setdefault(i, []).extend(choice.get("token_ids") or [])
    if choice.get("finish_reason") is not None or i not in out.finish_reasons:
        out.finish_reasons[i] = choice.get("finish_reason")
