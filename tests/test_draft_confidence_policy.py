"""benchmarks/draft_confidence_policy.py: what it records and how it prices a policy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from chimera_vllm.decoding import SpeculativeDecoder
from chimera_vllm.model import ChimeraDraft
from chimera_vllm.tiny import grammar_prompts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A benchmarks/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


policy_bench = load_benchmark("draft_confidence_policy")

COST = policy_bench.CostModel(target_ms=[10.0, 12.0, 15.0], draft_step_ms=2.0, overhead_ms=1.0)


def test_cost_model_extends_the_last_increment():
    assert [COST.target(q) for q in (1, 2, 3, 4, 5)] == [10.0, 12.0, 15.0, 18.0, 21.0]
    assert COST.step(3, 2) == 1.0 + 15.0 + 2 * 2.0
    fixed = policy_bench.CostModel([10.0], draft_step_ms=2.0, overhead_ms=1.0, draft_fixed_ms=3.0)
    assert (fixed.step(1, 0), fixed.step(2, 2)) == (11.0, 1.0 + 10.0 + 3.0 + 2 * 2.0)  # paid only when drafting


def test_a_policy_keeps_the_sure_prefix_and_pays_for_the_token_that_stopped_it():
    steps = [
        {"probability": [0.9, 0.8, 0.2], "accepted": 3},  # stops before the third: keeps 2 of 3 accepted
        {"probability": [0.1, 0.9, 0.9], "accepted": 2},  # stops at once: nothing kept, one draft step run
        {"probability": [0.95, 0.95, 0.95], "accepted": 1},  # drafts all 3, 1 accepted
    ]
    p = policy_bench.price(policy_bench.Policy(max_tokens=3, min_tokens=0, threshold=0.5), steps, COST)
    assert p.tau == pytest.approx((3 + 1 + 2) / 3)
    assert p.draft_steps == pytest.approx((3 + 1 + 3) / 3)
    assert p.ms_per_step == pytest.approx((COST.step(3, 3) + COST.step(1, 1) + COST.step(4, 3)) / 3)
    assert p.speedup == pytest.approx(p.tau / p.ms_per_step * COST.step(1, 0))
    # keeping at least one token: the second step keeps its first draft and the sure ones after it
    q = policy_bench.price(policy_bench.Policy(max_tokens=3, min_tokens=1, threshold=0.5), steps, COST)
    assert q.tau == pytest.approx((3 + 3 + 2) / 3)
    # fixed K' = 2 (threshold 0): every step verifies 2 drafts
    fixed = policy_bench.price(policy_bench.Policy(max_tokens=2, min_tokens=1, threshold=0.0), steps, COST)
    assert (fixed.tau, fixed.draft_steps, fixed.ms_per_step) == pytest.approx((8 / 3, 2.0, COST.step(3, 2)))


def test_recorded_steps_agree_with_the_decoder_and_leave_the_draft_as_it_was(trained_pair):
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 3, seed=5)
    steps = policy_bench.record_steps(target, trained, prompts, 3, set(), 24)
    assert "propose" not in vars(trained) and type(trained).propose is ChimeraDraft.propose
    outputs, stats = [], []
    for p in prompts:
        out, s = SpeculativeDecoder(target, trained, 3).generate([p], 24, set())
        outputs += out
        stats.append(s)
    assert len(steps) == sum(s.target_steps for s in stats)
    assert sum(s["accepted"] for s in steps) == sum(s.accepted_tokens for s in stats)
    assert all(len(s["probability"]) == 3 and all(0 < x <= 1 for x in s["probability"]) for s in steps)


def test_lookup_policy_by_category_prices_each_categorys_own_steps(monkeypatch):
    # the benchmark imports its neighbour as a script does; the path is restored after the test (a
    # benchmarks/ folder left on sys.path would shadow packages in vLLM's spawned processes: `kernels`)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    lookup_bench = load_benchmark("prompt_lookup_policy")
    step = lookup_bench.SimulatedStep
    chimera, ngram, hybrid = lookup_bench.BY_CATEGORY
    steps = {
        chimera: {"code": [step(1, 1, 1)], "prose": [step(1, 0, 1)]},
        ngram: {"code": [step(4, 4, 0)], "prose": [step(0, 0, 0)]},
        hybrid: {"code": [step(4, 3, 0), step(1, 1, 1)], "prose": [step(1, 0, 1)]},
    }
    header, rows = lookup_bench.category_table(steps, COST)
    assert header[0] == "category" and len(header) == 5
    # prose: the hybrid keeps nothing at 1 + 12 + 2 ms against 11 ms a plain step; code: τ (4 + 2) / 2
    assert rows[0] == ["prose", "1.00 / 0.73x", "1.00 / 1.00x", "1.00 / 0.73x", "0.00"]
    assert rows[1][0] == "code" and rows[1][3].startswith("3.00 / ") and rows[1][4] == "0.50"
