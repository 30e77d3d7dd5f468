"""Draft trees: their structure, tree drafting, and lossless greedy tree verification."""

from __future__ import annotations

import json
import re

import pytest
import torch

from chimera_vllm.cli import main
from chimera_vllm.evaluation.acceptance import evaluate
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.tree import DraftTree, DraftTreeError
from chimera_vllm.reference.decoding import DecodeStats, SpeculativeDecoder, _Requests
from chimera_vllm.reference.target import load_target
from chimera_vllm.testing.tiny import grammar_prompts

from .conftest import hf_greedy, load_benchmark
from .test_decoding import EOS, mixed_prompts


def test_branching_tree_lists_every_path_parent_first():
    tree = DraftTree.from_branching([2, 2])
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1))
    assert tree.parents == [-1, -1, 0, 0, 1, 1]
    assert tree.depth == 2 and tree.num_nodes == 6
    assert tree.expanding(0) == [-1] and tree.expanding(1) == [0, 1]
    assert tree.choices(0) == 2 and tree.choices(1) == 2
    assert tree.slot_depths().tolist() == [0, 1, 1, 2, 2, 2, 2]


def test_visibility_is_each_slot_with_its_ancestors():
    tree = DraftTree(((0,), (1,), (1, 0)))  # slots: root, (0), (1), (1, 0)
    assert tree.visibility().int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 1, 1],
    ]


def test_best_tree_takes_the_likeliest_paths():
    # depth 0: ranks 0/1 right 60% / 30% of the time; depth 1: 50% / 10%
    tree = DraftTree.best([[0.6, 0.3], [0.5, 0.1]], num_nodes=4)
    # path probabilities: (0) .6, (1) .3, (0,0) .3, (1,0) .15, (0,1) .06
    assert set(tree.paths) == {(0,), (1,), (0, 0), (1, 0)}
    assert DraftTree.best([[0.6, 0.3], [0.5, 0.1]], num_nodes=3).depth == 2


def test_parse_branching_and_json_file(tmp_path):
    assert DraftTree.parse("3,1") == DraftTree.from_branching([3, 1])
    path = tmp_path / "tree.json"
    tree = DraftTree(((0,), (1,), (0, 0)))
    tree.save(path)
    assert json.loads(path.read_text()) == [[0], [1], [0, 0]]
    assert DraftTree.parse(str(path)) == tree


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DraftTree(((0,), (1, 0))), r"\[1, 0\] has no parent \[1\]"),
        (lambda: DraftTree(((0,), (-1,))), r"\[-1\]: ranks must be integers >= 0"),
        (lambda: DraftTree(((0,), (0,))), "twice"),
        (lambda: DraftTree(()), "at least one node"),
        (lambda: DraftTree.parse("3,x"), "'3,x'"),
        (lambda: DraftTree.parse("3,0"), r"\[3, 0\]"),
    ],
)
def test_bad_trees_are_refused_naming_the_value(make, message):
    with pytest.raises(DraftTreeError, match=message):
        make()


def test_bad_tree_file_names_the_file(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text("{not json")
    with pytest.raises(DraftTreeError, match="tree.json"):
        DraftTree.parse(str(path))


@pytest.mark.parametrize("head_type", ["residual", "medusa"])
def test_random_draft_tree_decoding_is_lossless_batched(tiny_target_dir, head_type):
    """Llama and Qwen2 targets, prompts of 1..23 tokens in one batch: rejected branches leave holes."""
    target = load_target(str(tiny_target_dir))
    draft = init_draft(target, str(tiny_target_dir), num_heads=3, seed=1, head_type=head_type)
    prompts = mixed_prompts(target.config.vocab_size, [1, 2, 3, 7, 12, 23])
    tree = DraftTree.from_branching([3, 2, 1])
    outputs, stats = SpeculativeDecoder(target, draft, tree=tree).generate(prompts, 40, {EOS})
    assert outputs == hf_greedy(target, prompts, 40, EOS)
    assert stats.draft_tokens == tree.num_nodes * stats.target_steps


def test_chain_tree_drafts_and_accepts_as_the_chain_does(trained_pair):
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 8, seed=3)
    chain_out, chain = SpeculativeDecoder(target, trained, 4).generate(prompts, 48, {EOS})
    tree_out, tree = SpeculativeDecoder(target, trained, tree=DraftTree.chain(4)).generate(prompts, 48, {EOS})
    assert tree_out == chain_out == hf_greedy(target, prompts, 48, EOS)
    assert tree.accepted_by_position == chain.accepted_by_position
    assert tree.target_steps == chain.target_steps


def test_wider_tree_accepts_more_and_stays_lossless(trained_pair):
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 8, seed=4)
    _, chain = SpeculativeDecoder(target, trained, 4).generate(prompts, 48, {EOS})
    tree = DraftTree.from_branching([3, 2, 2, 1])
    outputs, stats = SpeculativeDecoder(target, trained, tree=tree).generate(prompts, 48, {EOS})
    assert outputs == hf_greedy(target, prompts, 48, EOS)
    assert stats.to_dict()["mean_accepted_length"] > chain.to_dict()["mean_accepted_length"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_step_keeps_exactly_the_verified_tokens(trained_pair, temperature):
    """Batch of one: after every step the cache holds the verified tokens and nothing else, also
    where the kept path ran behind a rejected sibling (it moves to the front; the rest is cropped),
    greedy or sampled."""
    _, target, tokenizer, _, trained = trained_pair
    decoder = SpeculativeDecoder(target, trained, tree=DraftTree.from_branching([2, 2, 1, 1]), temperature=temperature)
    reqs = _Requests(grammar_prompts(tokenizer, 1, seed=1), 40, set())
    state = decoder._prefill(reqs)
    stats = DecodeStats.zeros(4, 1)
    behind_a_sibling = 0
    while state.rows:
        nodes = decoder.draft.propose_tree(decoder._draft_inputs(reqs, state), decoder.tree)[0].tolist()
        before = len(reqs.tokens[0])
        decoder._step(reqs, state, stats)
        if state.rows:
            kept = reqs.tokens[0][before:-1]  # the drafts kept, before the target's own token
            # nodes are listed by depth: a kept node of depth 2 or more, or the second depth-1
            # node, comes after a rejected one in the step's slots
            behind_a_sibling += len(kept) >= 2 or kept == nodes[1:2]
            assert bool(state.valid.all()) and int(state.next_pos[0]) == len(reqs.tokens[0]) - 1
            assert state.cache.get_seq_length() == state.valid.shape[1] == state.ctx_k.shape[2]
    assert behind_a_sibling > 0, "the test needs a kept node behind a rejected sibling"


def test_tree_needs_a_draft_and_enough_heads(trained_pair):
    _, target, _, _, trained = trained_pair
    tree = DraftTree.from_branching([2, 1])
    with pytest.raises(ValueError, match="needs a draft"):
        SpeculativeDecoder(target, tree=tree)
    with pytest.raises(ValueError, match="num_speculative_tokens=3 but the draft tree is 2 deep"):
        SpeculativeDecoder(target, trained, 3, tree=tree)
    with pytest.raises(ValueError, match="5"):
        SpeculativeDecoder(target, trained, tree=DraftTree.chain(5))


def test_tree_propose_matches_the_chain_on_its_first_choices(trained_pair):
    """The tree's rank-0 path is the chain's draft: same states, same tokens."""
    _, target, tokenizer, _, trained = trained_pair
    decoder = SpeculativeDecoder(target, trained, 4)
    reqs = _Requests(grammar_prompts(tokenizer, 3, seed=7), 40, set())
    state = decoder._prefill(reqs)
    inputs = decoder._draft_inputs(reqs, state)
    chain, _ = trained.propose(inputs, 4)
    tree = DraftTree.from_branching([2, 2, 2, 2])
    nodes = trained.propose_tree(inputs, tree)
    first = [tree.paths.index((0,) * d) for d in range(1, 5)]
    assert torch.equal(nodes[:, first], chain)


def test_eval_with_a_tree_agrees_with_the_decoder(trained_pair):
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 6, seed=8)
    tree = DraftTree.from_branching([2, 2, 1])
    result = evaluate(target, trained, prompts, 3, 40, set(), tree=tree)
    _, stats = SpeculativeDecoder(target, trained, tree=tree).generate(prompts, 40)
    assert result.mean_accepted_length == pytest.approx(stats.to_dict()["mean_accepted_length"])
    assert result.outputs_identical and result.tree == [list(p) for p in tree.paths]


def test_make_tree_then_eval_with_it(capsys, trained_pair, tmp_path):
    """make-tree writes the likeliest tree of the asked size; eval --tree decodes with it, losslessly."""
    target_dir, _, _, _, trained = trained_pair
    trained.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the red cat sees\nthe old baker\na small dog\n")
    common = ["--target", str(target_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts)]
    tree_file = tmp_path / "tree.json"
    assert main(["make-tree", *common, "--nodes", "6", "--out", str(tree_file), "--max-new-tokens", "24"]) == 0
    assert re.search(r"6 nodes, \d deep; expected mean accepted length \d\.\d\d", capsys.readouterr().out)
    tree = DraftTree.parse(str(tree_file))
    assert tree.num_nodes == 6 and (0,) in tree.paths
    assert main(["eval", *common, "--tree", str(tree_file), "--max-new-tokens", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outputs_identical"] and result["tree"] == [list(p) for p in tree.paths]
    assert result["num_speculative_tokens"] == tree.depth
    assert main(["generate", *common, "--tree", "2,1", "--engine", "vllm"]) == 2
    assert "--tree runs on the reference decoder" in capsys.readouterr().err


def test_tree_benchmark_reports_every_method_against_no_draft(trained_pair, tmp_path):
    """float32: every method's greedy output equals no draft's, prompt by prompt."""
    target_dir, _, _, _, trained = trained_pair
    trained.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the red cat sees\nthe old baker\n")
    bench = load_benchmark("tree_decoding")
    out = tmp_path / "tree"
    argv = ["--target", str(target_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts)]
    bench.main(
        [*argv, "--methods", "chain:2", "tree:2,2", "--dtype", "float32", "--max-new-tokens", "16"]
        + ["--rounds", "2", "--out", str(out)]
    )
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == ["none", "chain:2", "tree:2,2"]
    assert [rows[m]["nodes"] for m in rows] == [0, 2, 6]
    assert all(r["equal"] == 4 and r["tokens"] == rows["none"]["tokens"] > 0 for r in rows.values())
    assert rows["none"]["mean_accepted_length"] == 1.0 and rows["tree:2,2"]["mean_accepted_length"] > 1.0
    assert out.with_suffix(".png").stat().st_size > 0 and "tree:2,2" in out.with_suffix(".md").read_text()
