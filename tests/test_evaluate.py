"""chimera-vllm eval: its numbers on a case known by construction, and on a trained draft."""

from __future__ import annotations

import json
import re

import pytest
import torch

from chimera_vllm.cli import main
from chimera_vllm.evaluation.acceptance import evaluate
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import load_target
from chimera_vllm.testing.tiny import grammar_prompts

from .conftest import hf_greedy


def test_a_target_that_always_says_token_zero(llama_dir):
    """Zero LM head: target and draft logits are all 0, so both pick token 0: every draft is accepted."""
    target = load_target(str(llama_dir))
    with torch.no_grad():
        target.get_output_embeddings().weight.zero_()
    draft = init_draft(target, str(llama_dir), num_heads=3)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    result = evaluate(target, draft, prompts, 3, max_new_tokens=13, eos_token_ids=set())
    assert result.mean_accepted_length == 4.0  # 12 tokens after the first come in 3 steps of K+1
    assert result.acceptance_by_position == [1.0, 1.0, 1.0]
    assert result.head_top1 == [1.0, 1.0, 1.0] and result.head_top5 == [1.0, 1.0, 1.0]
    assert result.head_rank_probability == [[1.0] + [0.0] * 15] * 3  # ties go to the lower id: token 0 first
    assert result.outputs_identical
    unsure, *others = result.head_top1_by_target_confidence  # uniform logits: probability 1/V everywhere
    assert (unsure.low, unsure.share, unsure.head_top1) == (0.0, [1.0] * 3, [1.0] * 3)
    assert all(b.share == [0.0] * 3 for b in others)
    unsure, *others = result.head_top1_by_draft_confidence  # the draft's logits are uniform too
    assert (unsure.low, unsure.share, unsure.head_top1) == (0.0, [1.0] * 3, [1.0] * 3)
    assert all(b.share == [0.0] * 3 for b in others)


def test_heads_are_scored_over_the_draft_vocabulary(llama_dir):
    """The target always says token 0; a draft vocabulary without it can never propose it."""
    target = load_target(str(llama_dir))
    with torch.no_grad():
        target.get_output_embeddings().weight.zero_()
    draft = init_draft(target, str(llama_dir), num_heads=2)
    draft.set_draft_vocab(torch.arange(1, 40))
    result = evaluate(target, draft, [[5, 6, 7], [9]], 2, max_new_tokens=9, eos_token_ids=set())
    assert result.mean_accepted_length == 1.0 and result.acceptance_by_position == [0.0, 0.0]
    assert result.head_top1 == [0.0, 0.0] and result.head_top5 == [0.0, 0.0]
    assert result.outputs_identical


def test_eval_agrees_with_the_decoder_and_ranks_drafts(trained_pair):
    _, target, tokenizer, untrained, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 8, seed=321)
    good = evaluate(target, trained, prompts, 4, 40, set())
    bad = evaluate(target, untrained, prompts, 4, 40, set())
    _, stats = SpeculativeDecoder(target, trained, 4).generate(prompts, 40)
    assert good.mean_accepted_length == pytest.approx(stats.to_dict()["mean_accepted_length"])
    assert good.acceptance_by_position == pytest.approx(stats.to_dict()["acceptance_by_position"])
    assert all(g > b for g, b in zip(good.head_top1, bad.head_top1))
    assert all(t5 >= t1 for t5, t1 in zip(good.head_top5, good.head_top1))
    assert good.head_top1[0] > 0.5 and good.outputs_identical


@pytest.fixture(scope="module")
def trained_eval(trained_pair):
    """(target, tokenizer, untrained draft, prompts, the trained draft's EvalResult at K = 4)."""
    _, target, tokenizer, untrained, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 8, seed=321)
    return target, tokenizer, untrained, prompts, evaluate(target, trained, prompts, 4, 40, set())


def assert_buckets_add_up(buckets, head_top1: list[float]) -> None:
    """The four buckets' shares sum to 1 per head, and their hits to the head's top-1."""
    assert [(b.low, b.high) for b in buckets] == [(0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.0)]
    for k, top1 in enumerate(head_top1):
        assert sum(b.share[k] for b in buckets) == pytest.approx(1.0)
        assert sum(b.share[k] * b.head_top1[k] for b in buckets) == pytest.approx(top1)


def test_head_accuracy_by_target_confidence_adds_up_and_buckets_the_targets_probabilities(trained_eval):
    target, _, _, prompts, result = trained_eval
    buckets = result.head_top1_by_target_confidence
    assert_buckets_add_up(buckets, result.head_top1)
    # head 0 labels x_{p+1} for p from the last prompt position + 1 on: the target's probability there
    probabilities = []
    for prompt, continuation in zip(prompts, hf_greedy(target, prompts, 40, eos=-1)):
        with torch.no_grad():
            logits = target(torch.tensor([prompt + continuation])).logits[0].float()
        probabilities += logits.softmax(-1).amax(-1)[len(prompt) : len(prompt) + len(continuation) - 1].tolist()
    sure = sum(p >= 0.95 for p in probabilities) / len(probabilities)
    assert buckets[3].share[0] == pytest.approx(sure, abs=1e-6) and 0 < sure < 1


def test_rank_probability_agrees_with_top1_and_top5(trained_eval):
    *_, result = trained_eval
    for ranks, top1, top5 in zip(result.head_rank_probability, result.head_top1, result.head_top5):
        assert ranks[0] == pytest.approx(top1) and sum(ranks[:5]) == pytest.approx(top5)
        assert 0 < sum(ranks) <= 1 + 1e-6


def test_head_accuracy_by_draft_confidence_adds_up_and_is_calibrated(trained_eval):
    """Grouped by the draft's probability of its own top token: a trained draft is right more often
    where it is sure than where it is not, and sure more often than an untrained one."""
    target, _, untrained, prompts, result = trained_eval
    buckets = result.head_top1_by_draft_confidence
    assert_buckets_add_up(buckets, result.head_top1)
    unsure, sure = buckets[0], buckets[3]
    assert unsure.share[0] > 0 and sure.share[0] > 0
    assert sure.head_top1[0] > unsure.head_top1[0]
    # the untrained draft's heads are the target's own LM head on other features: rarely sure
    assert evaluate(target, untrained, prompts, 4, 40, set()).head_top1_by_draft_confidence[3].share[0] < sure.share[0]


def test_metrics_by_category_are_each_categorys_own(trained_pair):
    """Per category, eval reports what it reports for that category's prompts alone; the weakest first."""
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 8, seed=321)
    categories = ["even" if i % 2 == 0 else "odd" for i in range(6)] + [None, None]
    result = evaluate(target, trained, prompts, 4, 40, set(), categories=categories)
    assert [c.mean_accepted_length for c in result.by_category] == sorted(
        c.mean_accepted_length for c in result.by_category
    )
    by_name = {c.category: c for c in result.by_category}
    assert sorted(by_name) == ["(no category)", "even", "odd"]
    for name, members in (("even", [0, 2, 4]), ("odd", [1, 3, 5]), ("(no category)", [6, 7])):
        alone = evaluate(target, trained, [prompts[i] for i in members], 4, 40, set())
        assert by_name[name].num_prompts == len(members)
        assert by_name[name].mean_accepted_length == pytest.approx(alone.mean_accepted_length)
        assert by_name[name].head_top1 == pytest.approx(alone.head_top1)
    assert len({c.mean_accepted_length for c in result.by_category}) > 1  # the categories do differ
    assert evaluate(target, trained, prompts[:2], 4, 8, set(), categories=[None, None]).by_category == []


def test_eval_cli_json(capsys, trained_pair, tmp_path):
    target_dir, target, tokenizer, _, trained = trained_pair
    trained.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the red cat sees\nthe old baker\n")
    code = main(
        [
            "eval",
            "--target",
            str(target_dir),
            "--draft",
            str(tmp_path / "draft"),
            "--prompts",
            str(prompts),
            "--num-speculative-tokens",
            "3",
            "--max-new-tokens",
            "24",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_prompts"] == 2 and len(result["head_top1"]) == 3 and result["outputs_identical"]
    assert result["by_category"] == []  # a plain-text prompt file has no categories


def test_eval_cli_prints_the_categories_of_a_jsonl_prompt_file(capsys, trained_pair, tmp_path):
    target_dir, _, _, _, trained = trained_pair
    trained.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "p.jsonl"
    lines = [{"turns": ["the red cat sees"], "category": "animals"}, {"turns": ["the old baker"], "category": "people"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "--target", str(target_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts)]
    assert main([*argv, "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert "by the prompts' category" in printed
    assert re.search(r"^  animals +1 prompts  \d\.\d{3}  ", printed, re.M)
    assert re.search(r"^  people +1 prompts  \d\.\d{3}  ", printed, re.M)


def test_compare_outputs_finds_each_divergence_and_its_top2_gap(llama_target):
    from chimera_vllm.evaluation.compare import compare_outputs

    prompt = [5, 6, 7, 8]
    expected = hf_greedy(llama_target, [prompt], 8, eos=-1)[0]
    with torch.no_grad():
        logits = llama_target(torch.tensor([prompt + expected[:3]])).logits[0, -1]
    top = torch.topk(logits, 3)
    second, third = top.indices[1].item(), top.indices[2].item()
    near = expected[:3] + [second] + expected[4:]
    far = expected[:3] + [third] + expected[4:]
    result = compare_outputs(llama_target, [prompt] * 4, [expected] * 4, [expected, near, far, expected[:5]])
    assert result.identical == 1 and result.match_rate == 0.25
    d_near, d_far, d_short = result.divergences
    assert (d_near.prompt_index, d_near.position, d_near.expected, d_near.got) == (1, 3, expected[3], second)
    assert d_near.top2_gap == pytest.approx((top.values[0] - top.values[1]).item(), abs=1e-5)
    assert d_near.near_tie(d_near.top2_gap + 1e-3) and not d_near.near_tie(d_near.top2_gap / 2)
    assert not d_far.near_tie(1e9)  # the third-best token is no near-tie, however large the tolerance
    assert (d_short.position, d_short.got) == (5, -1)
    assert not result.only_near_ties


def test_bench_marks_divergences_at_near_ties(llama_target):
    from chimera_vllm.bench.throughput import Row, check_divergences, markdown_table

    prompt = [5, 6, 7, 8]
    expected = hf_greedy(llama_target, [prompt], 8, eos=-1)[0]
    with torch.no_grad():
        second = torch.topk(llama_target(torch.tensor([prompt + expected[:2]])).logits[0, -1], 2).indices[1].item()

    def row(method: str, outputs) -> Row:
        return Row("bfloat16", method, 1, 0.0, 2, 16, 1.0, 16.0, 62.5, 1.0, [], outputs=outputs)

    rows = [row("none", [expected, expected]), row("chimera:4", [expected, expected[:2] + [second] + expected[3:]])]
    rows[1].outputs_identical = False
    check_divergences(rows, llama_target, [prompt, prompt])
    assert rows[1].match_rate == 0.5 and rows[0].match_rate is None
    gap = torch.topk(llama_target(torch.tensor([prompt + expected[:2]])).logits[0, -1], 2).values
    assert rows[1].only_near_ties == (float(gap[0] - gap[1]) < 0.25)
    assert "no (50% equal)" in markdown_table(rows)
