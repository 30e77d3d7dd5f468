"""benchmarks/prompt_lookup_policy.py: its cost model, its policies and how it prices them."""

from __future__ import annotations

from .conftest import load_benchmark

policy_bench = load_benchmark("prompt_lookup_policy")

COST = policy_bench.CostModel(target_ms=[10.0, 12.0, 15.0], draft_step_ms=2.0, overhead_ms=1.0)


def test_cost_model_extends_the_last_increment():
    assert [COST.target(q) for q in (1, 2, 3, 4, 5)] == [10.0, 12.0, 15.0, 18.0, 21.0]
    assert COST.step(3, 2) == 1.0 + 15.0 + 2 * 2.0
    fixed = policy_bench.CostModel([10.0], draft_step_ms=2.0, overhead_ms=1.0, draft_fixed_ms=3.0)
    assert (fixed.step(1, 0), fixed.step(2, 2)) == (11.0, 1.0 + 10.0 + 3.0 + 2 * 2.0)  # paid only when drafting


def test_policies_price_each_threshold_only_where_it_can_change_a_fixed_share():
    plans = {
        p.method: p for p in policy_bench.policies(max_k=3, heads=2, min_probabilities=[0.5], keep_at_least=[0, 1])
    }
    assert [m for m in plans if "@" not in m] == [
        "ngram:1",
        "ngram:2",
        "ngram:3",
        "ngram:4",
        "chimera:1",
        "chimera:2",
        "chimera+ngram:1:1",
        "chimera+ngram:2:1",
        "chimera+ngram:2:2",
        "chimera+ngram:3:1",
        "chimera+ngram:3:2",
    ]
    assert plans["ngram:4"].draft_tokens is None and plans["chimera+ngram:3:2"].lookup
    at_four = [p.method for p in policy_bench.policies(max_k=4, heads=2, min_probabilities=[], keep_at_least=[0])]
    assert len(at_four) == len(set(at_four))  # n-gram K = 4 once, not twice
    # keeping the first token whatever its probability leaves a one-token share as it is
    assert "chimera:1@0.5" in plans and "chimera:1@0.5 keep 1" not in plans
    keep = plans["chimera+ngram:3:2@0.5 keep 1"]
    assert (keep.k, keep.lookup, keep.draft_tokens, keep.min_probability, keep.min_tokens) == (3, True, 2, 0.5, 1)


def test_by_category_prices_each_categorys_own_steps():
    step = policy_bench.SimulatedStep
    chimera, ngram, hybrid = policy_bench.BY_CATEGORY
    steps = {
        chimera: {"code": [step(1, 1, 1)], "prose": [step(1, 0, 1)]},
        ngram: {"code": [step(4, 4, 0)], "prose": [step(0, 0, 0)]},
        hybrid: {"code": [step(4, 3, 0), step(1, 1, 1)], "prose": [step(1, 0, 1)]},
    }
    header, rows = policy_bench.category_table(steps, COST)
    assert header[0] == "category" and len(header) == 5
    # prose: the hybrid keeps nothing at 1 + 12 + 2 ms against 11 ms a plain step; code: τ (4 + 2) / 2
    assert rows[0] == ["prose", "1.00 / 0.73x", "1.00 / 1.00x", "1.00 / 0.73x", "0.00"]
    assert rows[1][0] == "code" and rows[1][3].startswith("3.00 / ") and rows[1][4] == "0.50"
