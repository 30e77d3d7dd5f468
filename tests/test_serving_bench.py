"""The serving benchmark's bookkeeping: loads, rows from vLLM's client results, ratios, report
(no servers; test_vllm_serving.py measures a load on a real one)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from chimera_vllm import cli
from chimera_vllm.bench.methods import Method
from chimera_vllm.bench.serving import (
    PERCENTILES,
    Load,
    ServingRow,
    add_ratios,
    markdown_table,
    measure_load,
    median_rows,
    plot,
    server_args,
)
from chimera_vllm.data import MT_BENCH
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.vllm.prompt_lookup import DRAFT_TOKENS_KEY
from chimera_vllm.vllm.server import server_command


def _result(tok_s: float, tpot_ms: float, tau: float | None = None) -> dict:
    """A result dict in the shape vllm.benchmarks.serve returns (the keys ServingRow reads)."""
    result = {
        "num_prompts": 10,
        "completed": 10,
        "duration": 12.5,
        "output_throughput": tok_s,
        "request_throughput": 0.8,
    }
    for metric, base in (("ttft", 40.0), ("tpot", tpot_ms), ("e2el", 128 * tpot_ms)):
        result[f"mean_{metric}_ms"] = base * 1.1
        result.update({f"p{p}_{metric}_ms": base * (1 + p / 100) for p in PERCENTILES})
    if tau is not None:
        result["spec_decode_acceptance_length"] = tau
    return result


def test_loads_print_and_refuse_bad_values_by_name():
    assert str(Load(concurrency=4)) == "4 in flight"
    assert str(Load(request_rate=2.0)) == "2 req/s"
    assert str(Load(concurrency=8, request_rate=0.5)) == "0.5 req/s, ≤8 in flight"
    with pytest.raises(ValueError, match="concurrency 0"):
        Load(concurrency=0)
    with pytest.raises(ValueError, match="request rate -1"):
        Load(request_rate=-1.0)
    with pytest.raises(ValueError, match="concurrency limit or a finite request rate"):
        Load()


def test_rows_and_ratios_against_no_speculation_at_the_same_load(tmp_path):
    one, rate = Load(concurrency=1), Load(request_rate=2.0)
    rows = [
        ServingRow.from_vllm(Method("none"), one, _result(50.0, 20.0)),
        ServingRow.from_vllm(Method("chimera", 2), one, _result(75.0, 12.5, tau=1.6)),
        ServingRow.from_vllm(Method("none"), rate, _result(80.0, 25.0)),
        ServingRow.from_vllm(Method("chimera", 2), rate, _result(60.0, 30.0, tau=1.4)),
    ]
    add_ratios(rows)
    assert rows[0].mean_accepted_length == 1.0 and rows[1].mean_accepted_length == 1.6
    assert rows[1].request_rate is None and rows[3].request_rate == 2.0
    assert rows[1].tpot_ms["p50"] == pytest.approx(12.5 * 1.5)
    assert rows[1].speedup == pytest.approx(1.5) and rows[1].tpot_ratio == pytest.approx(20.0 / 12.5)
    assert rows[3].speedup == pytest.approx(0.75) and rows[3].tpot_ratio == pytest.approx(25.0 / 30.0)
    assert rows[0].speedup == pytest.approx(1.0)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| chimera:2 | 2 req/s | 10/10 |" in table and "1.50x" in table
    plot(rows, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    json.dumps([r.__dict__ for r in rows])  # the report's rows are plain JSON


def test_rounds_give_each_method_and_load_its_medians_with_ratios_against_its_own_round(tmp_path):
    """Three rounds whose no-speculation speed drifts: each ratio is against its round's, the table
    shows medians (speedup with its range) and the requests of every round."""
    one = Load(concurrency=1)
    rounds = [(50.0, 75.0, 20.0, 12.5), (40.0, 72.0, 25.0, 13.0), (60.0, 66.0, 17.0, 16.0)]
    rows = []
    for i, (none_tok_s, chimera_tok_s, none_tpot, chimera_tpot) in enumerate(rounds):
        rows.append(ServingRow.from_vllm(Method("none"), one, _result(none_tok_s, none_tpot), round=i))
        rows.append(ServingRow.from_vllm(Method("chimera", 2), one, _result(chimera_tok_s, chimera_tpot, 1.6), round=i))
    add_ratios(rows)
    speedups = [r.speedup for r in rows if r.method == "chimera:2"]
    assert speedups == pytest.approx([1.5, 1.8, 1.1])  # a ratio against the first round's would give 1.44 and 1.32
    medians = median_rows(rows)
    assert [(r.method, r.load) for r in medians] == [("none", "1 in flight"), ("chimera:2", "1 in flight")]
    chimera = medians[1]
    assert chimera.speedup == pytest.approx(1.5) and chimera.speedup_range == pytest.approx((1.1, 1.8))
    assert chimera.output_tokens_per_s == pytest.approx(72.0) and chimera.completed == chimera.requests == 30
    assert chimera.tpot_ms["p50"] == pytest.approx(13.0 * 1.5) and chimera.tpot_ratio == pytest.approx(20.0 / 12.5)
    assert medians[0].speedup_range == pytest.approx((1.0, 1.0))
    table = markdown_table(rows)
    assert table.startswith("Medians over 3 rounds") and "| chimera:2 | 1 in flight | 30/30 | 72.0 |" in table
    assert "1.50x (1.10-1.80)" in table and table.count("| none |") == 1
    plot(rows, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 10_000


def test_a_load_keeps_the_clients_printout_off_the_console_and_names_failed_requests(monkeypatch, capsys):
    import vllm.benchmarks.serve as client

    async def client_main(args):
        print(args, "and the client's own report")
        return {"errors": ["", "HTTP 400: the prompt is too long", ""]}

    monkeypatch.setattr(client, "main_async", client_main)
    prompts = str(MT_BENCH)
    result = measure_load("http://127.0.0.1:9", "unused", prompts, Load(concurrency=1), 3, 8)
    printed = capsys.readouterr()
    assert result["errors"][1] == "HTTP 400: the prompt is too long"
    assert "client's own report" not in printed.out
    assert "1 in flight: 1 of 3 requests failed, the first with: HTTP 400: the prompt is too long" in printed.err


def test_server_args_carry_dtype_length_and_pass_extra_arguments_last():
    args = server_args("float32", 1024, ["--max-num-seqs", "8"])
    assert args == ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8"]


def test_the_server_command_is_vllm_serve_with_the_platforms_defaults_unless_overridden():
    cmd = server_command("TARGET", None, ["--max-num-seqs", "8"])
    assert cmd[1:5] == ["-m", "chimera_vllm.vllm.server", "serve", "TARGET"]
    assert cmd[-2:] == ["--max-num-seqs", "8"]
    assert ("--enforce-eager" in cmd) == (not torch.cuda.is_available())  # vLLM compiles for minutes on CPU
    compiled = server_command("TARGET", None, ["--no-enforce-eager", "--kv-cache-memory-bytes=1000"])
    assert "--enforce-eager" not in compiled and "--kv-cache-memory-bytes" not in compiled
    assert compiled[-2:] == ["--no-enforce-eager", "--kv-cache-memory-bytes=1000"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--concurrency", "0"], "concurrency 0"),
        (["--request-rates", "0"], "request rate 0"),
        (["--methods", "hf"], "method hf"),
        (["--methods", "ngram:4@2"], "chimera methods take @N"),
        (["--methods", "none", "chimera:2@4", "chimera:2@4"], "method 'chimera:2@4' is listed twice"),
        (["--concurrency", "--request-rates"], "no loads"),
        (["--rounds", "0"], "--rounds must be 1 or more, got 0"),
    ],
)
def test_bench_serving_refuses_bad_loads_and_methods_before_starting_a_server(argv, named, capsys):
    assert cli.main(["bench-serving", "--target", "unused", *argv]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lookup-tokens", "4"], "--lookup-tokens 4 is prompt lookup beside a draft: give --draft"),
        (["--draft", "no-such-draft", "--lookup-tokens", "4"], "no Chimera draft config at no-such-draft"),
        (["--draft", "unused", "--num-speculative-tokens", "1", "--lookup-tokens", "-1"], "got -1"),
        (["--draft", "unused", "--num-speculative-tokens", "1", "--max-speculative-batch", "0"], "got 0"),
        (["--max-speculative-batch", "1"], "--max-speculative-batch 1 schedules a draft's speculation: give --draft"),
    ],
)
def test_serve_refuses_bad_prompt_lookup_settings_before_starting_a_server(argv, named, capsys):
    assert cli.main(["serve", "unused", *argv]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "spec"),
    [
        ([], {"num_speculative_tokens": 4}),  # the draft's heads
        (["--num-speculative-tokens", "2"], {"num_speculative_tokens": 2}),
        (
            ["--lookup-tokens", "4", "--num-speculative-tokens", "1"],
            {"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5, DRAFT_TOKENS_KEY: 1},
        ),
        (
            ["--lookup-tokens", "4", "--max-speculative-batch", "2"],
            {
                "num_speculative_tokens": 4,
                "num_speculative_tokens_per_batch_size": [[1, 2, 4], [3, 1 << 20, 0]],
                "prompt_lookup_min": 2,
                "prompt_lookup_max": 5,
                DRAFT_TOKENS_KEY: 4,
            },
        ),
        (
            ["--num-speculative-tokens", "2", "--max-speculative-batch", "1"],
            {"num_speculative_tokens": 2, "num_speculative_tokens_per_batch_size": [[1, 1, 2], [2, 1 << 20, 0]]},
        ),
    ],
)
def test_serve_passes_the_drafts_speculative_config_to_vllms_server(argv, spec, monkeypatch):
    execs = []
    monkeypatch.setattr(os, "execve", lambda executable, cmd, env: execs.append(cmd))
    assert cli.main(["serve", "TARGET", "--draft", "smollm2-135m-instruct", *argv]) == 0
    (cmd,) = execs
    assert cmd[2:5] == ["chimera_vllm.vllm.server", "serve", "TARGET"]
    assert json.loads(cmd[cmd.index("--speculative-config") + 1]) == {
        "model": resolve_draft("smollm2-135m-instruct"),
        **spec,
    }


@pytest.mark.parametrize("command", ["bench", "profile-step"])
def test_benchmarks_refuse_a_method_listed_twice_before_starting_an_engine(command, tmp_path, capsys):
    argv = [command, "--target", "unused", "--methods", "none", "ngram:4", "none", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "method 'none' is listed twice" in capsys.readouterr().err


def test_profile_step_refuses_an_out_whose_traces_exist_before_starting_an_engine(tmp_path, capsys):
    (tmp_path / "prof-traces" / "chimera-2@4").mkdir(parents=True)
    argv = ["profile-step", "--target", "unused", "--methods", "none", "chimera:2@4", "--out", str(tmp_path / "prof")]
    assert cli.main(argv) == 2
    assert f"{tmp_path / 'prof-traces' / 'chimera-2@4'} exists" in capsys.readouterr().err
