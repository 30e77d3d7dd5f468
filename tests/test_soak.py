"""The soak (chimera-vllm soak): its traffic, its client's reading of every answer, its comparisons,
and a short soak of the tiny pair in float32 that must lose nothing, leak nothing and change no
greedy output, with faulty drafts served and damaged ones refused."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import replace

import httpx
import pytest

from chimera_vllm import cli
from chimera_vllm.bench.soak.client import Outcome, send
from chimera_vllm.bench.soak.compare import ALPHA, answered_by_both, compare_greedy, compare_sampled
from chimera_vllm.bench.soak.report import SoakSettings, passed, soak, write_report
from chimera_vllm.bench.soak.traffic import REFUSALS, PromptPool, RequestSpec, make_traffic
from chimera_vllm.testing.tiny import grammar_prompts

POOL = PromptPool(texts=["the cat", "a dog ran", "hello"], token_ids=list(range(5, 400)), max_model_len=512)


def test_the_same_seed_gives_the_same_traffic_with_every_kind_in_it():
    traffic = make_traffic(POOL, 3000, seed=3, max_tokens=32)
    assert traffic == make_traffic(POOL, 3000, seed=3, max_tokens=32)
    assert traffic != make_traffic(POOL, 3000, seed=4, max_tokens=32)
    refused = Counter(r.refusal for r in traffic if r.refusal)
    assert set(refused) == set(REFUSALS) and 0.03 < sum(refused.values()) / len(traffic) < 0.07
    served = [r for r in traffic if not r.refusal]
    streams = [r for r in served if r.stream]
    assert 0.06 < sum(r.drop_after_chunks is not None for r in streams) / len(streams) < 0.14
    assert {r.chat for r in served} == {True, False}
    assert {r.structured for r in served} == {None, "json", "regex"}
    sampled = [r for r in served if not r.greedy]
    assert any(r.seed is not None for r in sampled) and any(r.seed is None for r in sampled)
    assert {r.n for r in sampled} == {1, 2} and all(r.n == 1 for r in served if r.greedy)
    lengths = [len(r.prompt) for r in served if isinstance(r.prompt, list)]
    assert min(lengths) == 1 and max(lengths) > 384  # one token to near the context
    assert all(len(r.prompt) + r.max_tokens < POOL.max_model_len for r in served if isinstance(r.prompt, list))
    too_long = [r for r in traffic if r.refusal == "too_long"]
    assert all(len(r.prompt) > POOL.max_model_len for r in too_long)


def test_a_request_body_says_what_the_request_is():
    spec = RequestSpec(0, chat=True, stream=True, prompt="hi", max_tokens=8, temperature=0.8, seed=7, n=2)
    body = replace(spec, structured="json", logprobs=True).body("m")
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["seed"] == 7 and body["n"] == 2
    assert body["structured_outputs"]["json"]["required"] == ["answer"] and body["top_logprobs"] == 3
    assert RequestSpec(1, False, False, "x", 8, refusal="unknown_model").body("m")["model"] != "m"
    logit_bias = RequestSpec(2, False, False, "x", 8, refusal="logit_bias")
    assert logit_bias.refused_by(speculative=True) and not logit_bias.refused_by(speculative=False)


def _stream(*events: dict | str) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _chunk(text: str, ids: list[int], finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]}


def _send(spec: RequestSpec, response: httpx.Response, speculative: bool = True) -> Outcome:
    async def go():
        transport = httpx.MockTransport(lambda request: response)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await send(client, spec, "m", speculative)

    return asyncio.run(go())


COMPLETION = RequestSpec(0, chat=False, stream=False, prompt="x", max_tokens=8)
STREAM = RequestSpec(1, chat=False, stream=True, prompt="x", max_tokens=8)
A, B = _chunk("a", [3]), _chunk("b", [4], "stop")


def _refusal(kind: str, stream: bool = False) -> RequestSpec:
    return RequestSpec(2, chat=stream, stream=stream, prompt="x", max_tokens=8, refusal=kind)


def _events(*events: dict | str) -> httpx.Response:
    return httpx.Response(200, content=_stream(*events))


@pytest.mark.parametrize(
    ("spec", "response", "speculative", "outcome"),
    [
        (COMPLETION, httpx.Response(200, json=_chunk("ab", [3, 4], "length")), True, "completed"),
        (STREAM, _events(A, B, "[DONE]"), True, "completed"),
        (STREAM, _events(A, B), True, "unexpected"),  # no [DONE]
        (COMPLETION, httpx.Response(500, text="boom"), True, "server_error"),
        (COMPLETION, httpx.Response(400, text="bad"), True, "unexpected"),
        (_refusal("too_long"), httpx.Response(400, text="too long"), True, "refused"),
        (_refusal("unknown_model"), httpx.Response(200, json=A), True, "unexpected"),
        # vLLM refuses some streamed requests with an error event after a 200
        (_refusal("logit_bias", stream=True), _events({"error": {"code": 400}}), True, "refused"),
        (_refusal("logit_bias", stream=True), _events({"error": {"code": 400}}), False, "unexpected"),
        (STREAM, _events({"error": {"code": 500}}), True, "server_error"),
        (RequestSpec(6, False, True, "x", 8, drop_after_chunks=1), _events(A, B, "[DONE]"), True, "dropped"),
    ],
)
def test_the_client_reads_every_kind_of_answer(spec, response, speculative, outcome):
    result = _send(spec, response, speculative)
    assert result.outcome == outcome, result.error
    if outcome == "completed":
        assert result.token_ids == {0: [3, 4]} and result.texts == {0: "ab"}


def test_a_lost_connection_is_an_unexpected_failure_not_an_exception():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://server") as client:
            return await send(client, COMPLETION, "m", True)

    result = asyncio.run(go())
    assert result.outcome == "unexpected" and "ConnectError" in result.error


def _completed(index: int, ids: list[int]) -> Outcome:
    return Outcome(index, "completed", 200, token_ids={0: ids})


def test_greedy_answers_are_compared_where_both_servers_completed_them():
    traffic = [RequestSpec(i, False, False, "x", 8) for i in range(4)]
    a = [_completed(0, [1, 2]), _completed(1, [3]), _completed(2, [5]), Outcome(3, "dropped")]
    b = [_completed(0, [1, 2]), _completed(1, [4]), Outcome(2, "refused"), _completed(3, [6])]
    result = compare_greedy(traffic, answered_by_both(a, b))
    assert (result.compared, result.identical) == (2, 1)
    assert result.first_differences == [{"request": 1, "a": {0: [3]}, "b": {0: [4]}}]


def _sampled_outcomes(n: int, weights: list[float], seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    return [_completed(i, rng.choices(range(len(weights)), weights, k=8)) for i in range(n)]


def test_sampled_answers_agree_from_one_distribution_and_differ_from_two():
    traffic = [RequestSpec(i, False, False, "x", 8, temperature=0.8) for i in range(300)]
    same = compare_sampled(
        traffic, answered_by_both(_sampled_outcomes(300, [5, 3, 2], 1), _sampled_outcomes(300, [5, 3, 2], 2))
    )
    assert [s.position_class for s in same] == ["first", "2-5", "6+"]
    assert all(s.p_value >= ALPHA and s.agrees(comparisons=3) for s in same)
    other = compare_sampled(
        traffic, answered_by_both(_sampled_outcomes(300, [5, 3, 2], 1), _sampled_outcomes(300, [3, 3, 4], 2))
    )
    assert all(s.p_value < ALPHA / 3 and not s.agrees(comparisons=3) for s in other)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--duration", "0"], "duration_s must be above 0, got 0.0"),
        (["--concurrency", "0"], "concurrency levels must be 1 or more, got [0]"),
        (["--max-tokens", "1024", "--max-model-len", "2048"], "max_tokens 1024 leaves no room for prompts"),
    ],
)
def test_soak_refuses_bad_settings_before_starting_a_server(argv, named, capsys, tmp_path):
    assert cli.main(["soak", "--target", "unused", "--draft", str(tmp_path), *argv]) == 2
    assert named in capsys.readouterr().err


def test_a_short_soak_of_the_tiny_pair_loses_nothing_and_changes_no_greedy_output(trained_pair, tmp_path):
    """10 s a server: no speculation, the trained draft, a NaN draft and a random one, then the
    three damaged drafts; the report's figures, as the issue names them."""
    target_dir, _, tokenizer, _, trained = trained_pair
    trained.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    texts = [tokenizer.decode(p) for p in grammar_prompts(tokenizer, 40, seed=5)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    settings = SoakSettings(
        str(target_dir), str(tmp_path / "draft"), str(prompts), duration_s=10, max_model_len=512, max_tokens=32,
        faulty=True,
    )  # fmt: skip
    out = tmp_path / "soak"
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LD_PRELOAD", raising=False)  # as from a shell (see test_vllm_serving.py)
        results = soak(settings, out)
    write_report(results, out, "test")
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["name"] for s in report["servers"]] == [
        "none", "chimera", "chimera (nan draft)", "chimera (random draft)"
    ]  # fmt: skip
    for server in report["servers"]:
        assert server["requests"] > 50 and server["completed"] > 0.7 * server["requests"], server
        assert server["dropped"] > 0 and server["refused_as_expected"] > 0, server
        assert (server["unexpected_failures"], server["server_errors"], server["crashes"]) == (0, 0, 0), server
        assert server["kv_usage_after_drain"] <= 0.01, server
        assert server["rss_start_mb"] > 0 and server["rss_end_mb"] > 0
    # requests with their own seed prefilled in chunks, which killed vLLM-CPU's engine, were served
    assert sum(server["seeded_chunked_completed"] for server in report["servers"]) > 0
    for pair in report["pairs"]:
        assert pair["greedy_identical"] == pair["greedy_compared"] > 10, pair["first_differences"]
        assert all(s["agrees"] for s in pair["sampled"]), pair["sampled"]
    for name, refusal in report["refused_at_start"].items():
        assert refusal["refused"], (name, refusal["message"])
    assert (
        "token id 105, outside the target's vocabulary 0..104"
        in report["refused_at_start"]["vocab_out_of_range"]["message"]
    )
    assert report["passed"] and passed(results)
    assert "Passed: yes" in out.with_suffix(".md").read_text()
