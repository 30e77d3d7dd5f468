"""The per-step breakdown of a profiler trace (chimera_vllm/step_profile.py), on synthetic traces."""

import gzip
import json

import pytest

from chimera_vllm.bench.step_profile import StepProfile, markdown_table, read_trace, summarize

RUNNER = "vllm/v1/worker/gpu_model_runner.py"


def _event(name: str, start: float, end: float) -> dict:
    return {"ph": "X", "name": name, "ts": start, "dur": end - start, "tid": 1}


def _chimera_step(t0: float, cpu: bool = False) -> list[dict]:
    """One engine step of a Chimera engine, in microseconds from t0, as vLLM's trace names it
    (cpu: the trigram and heads run as CpuDraftGemms methods, not modules)."""
    spans = [
        (f"{RUNNER}(3939): execute_model", 0, 100),
        (f"{RUNNER}(3620): _model_forward", 10, 70),
        (f"{RUNNER}(4303): sample_tokens", 100, 150),
        (f"{RUNNER}(3437): _sample", 100, 110),
        (f"{RUNNER}(4362): propose_draft_token_ids", 110, 145),
        (f"{RUNNER}(4748): propose_draft_token_ids", 111, 144),  # nested twin: counted once
        ("/x/chimera_vllm/vllm/proposer.py(156): _write_context", 112, 115),
        ("nn.Module: ChimeraDraftForVLLM_0", 115, 130),
        ("/x/chimera_vllm/vllm/cpu_gemm.py(44): trigram" if cpu else "nn.Module: TrigramEncoder_0", 116, 120),
        ("nn.Module: ChimeraEncoderLayer_0", 120, 127),
        ("/x/chimera_vllm/vllm/cpu_gemm.py(50): residual_head" if cpu else "nn.Module: ResidualHeads_0", 127, 129),
        ("/x/chimera_vllm/vllm/model.py(190): greedy_tokens", 130, 135),
        ("_C::onednn_mm", 20, 30),
        ("aten::addmm", 31, 33),  # onednn_mm's twin, as a plain torch op
        ("aten::add", 33, 34),  # not a component
        ("vllm/model_executor/models/llama.py(546): compute_logits", 72, 80),
        ("vllm/model_executor/models/medusa.py(90): compute_logits", 140, 141),  # a Medusa draft's
        ("vllm::unified_attention_with_output", 40, 46),
        ("vllm::unified_kv_cache_update", 46, 47),
        ("vllm::unified_attention_with_output", 121, 123),  # the draft's: not the target's attention
        ("vllm::unified_kv_cache_update", 113, 114),  # the context write's
    ]
    return [_event(name, t0 + a, t0 + b) for name, a, b in spans]


@pytest.mark.parametrize("cpu", [False, True])
def test_components_are_summed_per_target_forward_pass_each_inside_its_parent(cpu):
    events = _chimera_step(0, cpu) + _chimera_step(1000, cpu) + [{"ph": "i", "name": "marker", "ts": 5}]
    profile = summarize(events)
    assert profile.steps == 2
    expected_us = {
        "engine step": 150,
        "target forward": 60,
        "linear layers": 12,
        "attention": 6,
        "KV-cache writes": 1,
        "target LM head": 8,
        "sampling / verification": 10,
        "draft proposal": 35,
        "write context (Chimera)": 3,
        "draft model forward": 15,
        "trigram encoder": 4,
        "encoder layer": 7,
        "residual heads": 2,
        "draft LM head + arg-max": 5,
    }
    assert profile.ms_per_step == pytest.approx({k: v / 1e3 for k, v in expected_us.items()})


def test_a_trace_without_a_forward_pass_is_refused():
    with pytest.raises(ValueError, match="no target forward pass"):
        summarize([_event(f"{RUNNER}(4303): sample_tokens", 0, 10)])


def test_table_shows_each_method_and_dashes_for_components_it_lacks():
    plain = StepProfile(3, {"engine step": 2.0, "target forward": 1.5})
    chimera = summarize(_chimera_step(0))
    table = markdown_table({"none": plain, "chimera:2": chimera})
    assert table.splitlines()[0] == "| component | none | chimera:2 |"
    assert "| &nbsp;&nbsp;target forward | 1.50 | 0.06 |" in table
    assert "| &nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;trigram encoder | - | 0.00 |" in table
    assert table.splitlines()[-1] == "| target forward passes | 3 | 1 |"


def test_read_trace_reads_the_one_gzipped_trace(tmp_path):
    events = _chimera_step(0)
    with gzip.open(tmp_path / "rank0.123.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert read_trace(tmp_path) == events
    (tmp_path / "rank0.456.pt.trace.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="found 2"):
        read_trace(tmp_path)
