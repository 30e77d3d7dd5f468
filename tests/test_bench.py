"""The benchmark's bookkeeping: method names, ratios and the tuned batch-size schedule (no engines)."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys

import pytest
import torch

from chimera_vllm.bench.methods import ANY_BATCH, Method
from chimera_vllm.bench.report import cpu_description
from chimera_vllm.bench.throughput import Row, add_ratios, identity, tuned_schedule
from chimera_vllm.vllm import engine as vllm_engine
from chimera_vllm.vllm.engine import openmp_runtime, preload_intel_openmp


def _row(method: str, batch_size: int, tok_s: float, dtype: str = "bfloat16") -> Row:
    return Row(dtype, method, batch_size, 0.0, 8, 100, 1.0, tok_s, 1.0, 1.5, [], outputs=[[1]])


def test_methods_parse_and_print():
    assert str(Method.parse("chimera:3")) == "chimera:3" and Method.parse("hf") == Method("hf")
    assert str(Method("chimera", 3, ((1, 4, 3), (5, 9, 0)))) == "chimera:auto"
    assert Method.parse("suffix").spec({}) == {"method": "suffix"} and str(Method.parse("suffix")) == "suffix"
    assert Method.parse("suffix:8").spec({}) == {"method": "suffix", "num_speculative_tokens": 8}
    assert str(Method.parse("suffix:8")) == "suffix:8"
    for bad in (
        "chimera",
        "none:2",
        "eagle:3",
        "hf:1",
        "ngram:4@2",
        "chimera:2@0",
        "chimera:2@",
        "suffix:x",
        "suffix:4@2",
        "eagle3",
        "eagle3:2@4",
    ):
        with pytest.raises(ValueError, match=bad):
            Method.parse(bad)


def test_an_eagle3_method_runs_vllms_proposer_on_an_export_only(tmp_path, llama_target, llama_dir):
    from chimera_vllm.model.checkpoint import init_draft

    eagle3 = Method.parse("eagle3:3")
    assert str(eagle3) == "eagle3:3"
    assert eagle3.spec({"eagle3": "DIR"}) == {"method": "eagle3", "model": "DIR", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="needs --eagle3"):
        eagle3.spec({"chimera": "DRAFT"})
    init_draft(llama_target, str(llama_dir), 3, head_type="eagle3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="export-eagle3"):
        eagle3.spec({"eagle3": str(tmp_path)})


def test_a_chimera_method_limited_to_a_batch_size_is_what_serve_runs_and_prints_back():
    hybrid = Method.parse("chimera+ngram:6:2@4")
    assert hybrid == Method.chimera(2, 6, max_batch=4)  # chimera-vllm serve --lookup-tokens 6 --max-speculative-batch 4
    assert str(hybrid) == "chimera+ngram:6:2@4" and str(Method.parse("chimera:2@1")) == "chimera:2@1"
    spec = hybrid.spec({"chimera": "draft"})
    assert spec["num_speculative_tokens"] == 6 and spec["chimera_num_speculative_tokens"] == 2
    assert spec["num_speculative_tokens_per_batch_size"] == [[1, 4, 6], [5, ANY_BATCH, 0]]


def test_tuned_schedule_takes_the_fastest_k_per_batch_size_and_zero_where_speculation_loses():
    rows = [
        _row("none", 1, 10.0),
        _row("chimera:2", 1, 14.0),
        _row("chimera:3", 1, 16.0),
        _row("none", 4, 30.0),
        _row("chimera:2", 4, 33.0),
        _row("chimera:3", 4, 31.0),
        _row("none", 16, 90.0),
        _row("chimera:2", 16, 80.0),
        _row("chimera:3", 16, 70.0),
        _row("none", 1, 5.0, dtype="float32"),
        _row("chimera:2", 1, 4.0, dtype="float32"),
    ]
    add_ratios(rows)
    assert tuned_schedule(rows, "bfloat16") == ((1, 1, 3), (2, 4, 2), (5, 1 << 20, 0))
    assert tuned_schedule(rows, "float32") is None  # speculation lost everywhere: no schedule


def test_a_prompt_lookup_hybrid_gets_its_own_schedule_from_itself_chimera_rows_within_its_share_and_none():
    hybrid = Method.parse("chimera+ngram:4:2")
    rows = [
        _row("none", 1, 10.0),
        _row("chimera:2", 1, 13.0),
        _row("chimera+ngram:4:2", 1, 16.0),
        _row("chimera+ngram:4:4", 1, 17.0),  # another hybrid: not this one's to schedule
        _row("none", 4, 30.0),
        _row("chimera:2", 4, 40.0),  # lookup's longer drafts cost more rows than they gain here
        _row("chimera:3", 4, 45.0),  # more than the hybrid's draft-model share: not schedulable
        _row("chimera+ngram:4:2", 4, 33.0),
        _row("none", 16, 90.0),
        _row("chimera:2", 16, 85.0),
        _row("chimera+ngram:4:2", 16, 60.0),
    ]
    add_ratios(rows)
    schedule = tuned_schedule(rows, "bfloat16", hybrid)
    assert schedule == ((1, 1, 4), (2, 4, 2), (5, 1 << 20, 0))
    assert tuned_schedule(rows, "bfloat16") == ((1, 1, 2), (2, 4, 3), (5, 1 << 20, 0))  # Chimera's own
    assert tuned_schedule(rows, "bfloat16", Method.parse("chimera+ngram:4:4"))[:2] == ((1, 1, 4), (2, 4, 3))
    auto = Method(hybrid.name, hybrid.k, schedule, hybrid.draft_k)
    assert str(auto) == "chimera+ngram:4:2:auto"
    spec = auto.spec({"chimera": "DRAFT"})
    assert spec["num_speculative_tokens_per_batch_size"] == [[1, 1, 4], [2, 4, 2], [5, 1 << 20, 0]]
    lookup = {"num_speculative_tokens": 4, "chimera_num_speculative_tokens": 2, "prompt_lookup_min": 2}
    assert lookup.items() <= spec.items()


def test_identity_cell_reports_the_match_rate_when_known():
    rows = [_row("none", 1, 10.0), _row("chimera:2", 1, 9.0), _row("ngram:3", 1, 9.0)]
    rows[2].outputs = [[2]]
    add_ratios(rows)
    assert [identity(r) for r in rows] == ["yes", "yes", "no"]
    rows[2].match_rate = 0.25
    assert identity(rows[2]) == "no (25% equal)"
    assert identity(_row("hf", 1, 5.0)) == "-"  # no ratios computed: no baseline compared


def test_target_steps_count_steps_without_a_draft():
    """Two requests of 10 tokens: 18 after their first tokens. If only 3 steps had a draft (n-gram)
    and they accepted 4 tokens, 14 target steps ran, not 3; with a draft every step, the count of
    drafts bounds it from below when a stop rule cut accepted tokens off."""
    from chimera_vllm.vllm.engine import SpecCounters, target_steps

    outputs = [list(range(10)), list(range(10))]
    assert target_steps(outputs, SpecCounters(drafts=3, draft_tokens=9, accepted_tokens=4)) == 14
    assert target_steps(outputs, SpecCounters()) == 18
    assert target_steps(outputs, SpecCounters(drafts=8, draft_tokens=24, accepted_tokens=12)) == 8


def test_cpu_description_names_the_model_and_the_instruction_sets_that_decide_bf16_speed():
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\n"
    assert cpu_description(cpuinfo) == "AMD EPYC, avx2"
    xeon = "model name : Xeon\nflags : avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert cpu_description(xeon) == "Xeon, avx2 avx512f avx512_bf16 amx_bf16"
    assert cpu_description("model name : Old\nflags : sse2\n") == "Old, none of avx2/avx512f/avx512_bf16/amx_bf16"


def test_a_reports_command_carries_the_vllm_cpu_settings_it_ran_under(monkeypatch):
    from chimera_vllm.bench.report import run_info

    for name in [k for k in os.environ if k.startswith("VLLM_CPU_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # not a setting of the CPU backend's speed
    assert (
        run_info("chimera-vllm bench --out X")["command"] == "VLLM_CPU_NUM_OF_RESERVED_CPU=0 chimera-vllm bench --out X"
    )


on_linux_x86 = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="Intel's OpenMP is preloaded on Linux x86 only"
)


@pytest.fixture
def intel_openmp(tmp_path, monkeypatch):
    """An environment prefix with vllm-cpu's Intel OpenMP in lib/, on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    return tmp_path


@on_linux_x86
def test_intel_openmp_is_preloaded_before_other_libraries_unless_an_openmp_runtime_is_named(intel_openmp):
    library = str(intel_openmp / "lib" / "libiomp5.so")
    env = {}
    assert preload_intel_openmp(env, str(intel_openmp)) and env == {"LD_PRELOAD": library}
    assert not preload_intel_openmp(env, str(intel_openmp)) and env == {"LD_PRELOAD": library}  # once
    env = {"LD_PRELOAD": "/x/libtcmalloc.so"}
    assert preload_intel_openmp(env, str(intel_openmp)) and env["LD_PRELOAD"] == f"{library}:/x/libtcmalloc.so"
    for chosen in ("/torch.libs/libgomp-a34b3233.so.1", "/opt/llvm/lib/libomp.so", "/opt/intel/libiomp5.so"):
        env = {"LD_PRELOAD": chosen}
        assert not preload_intel_openmp(env, str(intel_openmp)) and env == {"LD_PRELOAD": chosen}


@on_linux_x86
def test_nothing_is_preloaded_without_the_library_or_on_a_gpu_machine(intel_openmp, tmp_path_factory, monkeypatch):
    env = {}
    assert not preload_intel_openmp(env, str(tmp_path_factory.mktemp("no_lib"))) and env == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not preload_intel_openmp(env, str(intel_openmp)) and env == {}


@on_linux_x86
def test_reports_name_the_openmp_runtime_the_engines_get(intel_openmp, monkeypatch):
    from chimera_vllm.bench.report import run_info

    monkeypatch.setattr(vllm_engine.sys, "prefix", str(intel_openmp))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert openmp_runtime() == run_info("x")["openmp"] == "intel"
    assert "LD_PRELOAD" not in os.environ  # only engines started later get it
    monkeypatch.setenv("LD_PRELOAD", "/torch.libs/libgomp-a34b3233.so.1")
    assert run_info("x")["openmp"] == "gnu"


def test_rounds_give_each_setting_the_median_of_its_per_round_speedups(tmp_path):
    """Each round's engines are compared with that round's no-speculation engine, not a pooled one."""
    from chimera_vllm.bench.throughput import markdown_table, median_rows, plot

    rows = [_row("none", 1, 10.0), _row("chimera:2", 1, 15.0), _row("none", 1, 20.0), _row("chimera:2", 1, 22.0)]
    rows += [_row("none", 1, 16.0), _row("chimera:2", 1, 20.0)]
    for i, r in enumerate(rows):
        r.round = i // 2
    add_ratios(rows)
    assert [r.speedup for r in rows[1::2]] == pytest.approx([1.5, 1.1, 1.25])
    none, chimera = median_rows(rows)
    assert (none.method, none.output_tokens_per_s, none.speedup_range) == ("none", 16.0, (1.0, 1.0))
    assert chimera.output_tokens_per_s == 20.0 and chimera.speedup == pytest.approx(1.25)
    assert chimera.speedup_range == pytest.approx((1.1, 1.5))
    table = markdown_table(rows)
    assert "Medians over 3 rounds" in table and "| 1.25 (1.10-1.50) |" in table
    assert median_rows(rows[:2]) == rows[:2] and "Medians" not in markdown_table(rows[:2])  # one round: as measured
    plot(rows, tmp_path / "rounds.png")  # the medians, each round a dot
    assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sampled = [dataclasses.replace(r, temperature=0.7) for r in rows if r.method == "none"]
    plot(rows + sampled, tmp_path / "panels.png")  # chimera:2 has no T = 0.7 rows: that panel goes without it
    assert (tmp_path / "panels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "rounds,tune,message",
    [(0, False, "--rounds must be 1 or more, got 0"), (2, True, "--rounds 2 alternates fixed methods")],
)
def test_bad_rounds_are_refused_before_an_engine_starts(rounds, tune, message):
    from chimera_vllm.bench.throughput import run

    with pytest.raises(ValueError, match=message):
        run(
            "no-such-target",
            {},
            [[1]],
            [Method("chimera", 2)],
            [1],
            ["bfloat16"],
            [0.0],
            8,
            set(),
            tune_schedule=tune,
            rounds=rounds,
        )
