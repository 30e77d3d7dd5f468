"""The EAGLE-3 baseline: vLLM's aux hidden states, training-time test, the speculators export, and
vLLM's own EAGLE-3 proposer serving it (lossless, drafting what this project's model drafts, with
none of the project's code on its path)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chimera_vllm import cli
from chimera_vllm.config import ChimeraConfig, ChimeraConfigError, TargetSpec
from chimera_vllm.model.base import DraftInputs, DraftModel, TargetParts
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.eagle3 import Eagle3Draft, default_aux_layers, step_context_mask
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import final_and_aux_hidden
from chimera_vllm.testing.tiny import grammar_prompts
from chimera_vllm.training.objective import ChimeraObjective, LossWeights
from chimera_vllm.training.trainer import TrainArgs, read_train_log, train


def randomised_eagle3(target, target_dir, num_heads: int = 4, seed: int = 0) -> Eagle3Draft:
    draft = init_draft(target, str(target_dir), num_heads, seed, head_type="eagle3")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return draft


def drafting_inputs(draft: Eagle3Draft, parts: TargetParts, ids, hidden, aux, n: int) -> DraftInputs:
    """What the drafting loop starts from once the target verified x_0..x_n of ids [1, T] and
    produced x_{n+1}: the draft's keys/values of positions 0..n-1 and the aux states of x_n."""
    ctx_k, ctx_v = draft.verified_kv(ids[:, 1 : n + 1], aux[:, :n], torch.arange(n)[None], parts)
    t = ids[0].tolist()
    last3 = torch.tensor([[t[max(n - 1, 0)], t[n], t[n + 1]]])
    valid = torch.ones(1, n, dtype=torch.bool)
    return DraftInputs(parts, ctx_k, ctx_v, valid, last3, torch.tensor([n + 1]), hidden[:, n], aux[:, n])


def test_default_aux_layers_are_vllms_where_the_target_has_them():
    assert default_aux_layers(30) == [2, 15, 27]  # SmolLM2-135M: vLLM's (2, L // 2, L - 3)
    assert default_aux_layers(2) == [0, 1, 2]  # the tiny target: (2, 1, -1) does not exist
    assert default_aux_layers(4) == [0, 2, 4]  # (2, 2, 1) names two layers only
    with pytest.raises(ChimeraConfigError, match="has 1"):
        default_aux_layers(1)


def test_config_refuses_aux_layers_that_do_not_fit_the_kind(llama_target):
    spec = TargetSpec.from_target_config(llama_target.config)
    with pytest.raises(ChimeraConfigError, match="aux_layers=None"):
        ChimeraConfig(spec, head_type="eagle3")
    with pytest.raises(ChimeraConfigError, match=r"aux_layers=\[0, 1, 2\]"):
        ChimeraConfig(spec, head_type="residual", aux_layers=[0, 1, 2])
    with pytest.raises(ChimeraConfigError, match=r"three distinct.*\[1, 1, 2\]"):
        ChimeraConfig(spec, head_type="eagle3", aux_layers=[1, 1, 2])
    assert ChimeraConfig(spec, head_type="eagle3", aux_layers=[2, 0, 1]).aux_layers == [0, 1, 2]


def test_aux_hidden_states_are_the_residual_stream_entering_each_layer(llama_target):
    """vLLM's aux state of layer i is the input of decoder layer i (hidden + residual); i = L is the
    last layer's output, whose final norm gives the last hidden state."""
    ids = torch.randint(5, 100, (2, 9))
    final, aux = final_and_aux_hidden(llama_target, ids, [0, 1, 2])
    states = llama_target.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    chunks = aux.chunk(3, dim=-1)
    torch.testing.assert_close(chunks[0], llama_target.get_input_embeddings()(ids))
    torch.testing.assert_close(chunks[1], states[1])
    torch.testing.assert_close(llama_target.base_model.norm(chunks[2]), final)
    with pytest.raises(ValueError, match="aux layer 3"):
        final_and_aux_hidden(llama_target, ids, [0, 1, 3])


def test_step_context_mask():
    m = step_context_mask(6, 2)  # query p sees the verified entries 1..p-2
    assert m[5].tolist() == [False, True, True, True, False, False]
    assert step_context_mask(6, 0)[3].tolist() == step_context_mask(6, 1)[3].tolist()  # itself is its own entry
    assert not m[:, 0].any()


def test_training_forward_equals_teacher_forced_drafting(llama_target, llama_dir):
    """Training-time test: step k's training logits at every position equal the drafting loop's,
    fed the true tokens, with a draft vocabulary."""
    K = 4
    draft = randomised_eagle3(llama_target, llama_dir, K)
    draft.set_draft_vocab(torch.arange(3, 90))
    parts = TargetParts.from_model(llama_target)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden, aux = final_and_aux_hidden(llama_target, ids, draft.config.aux_layers)
    with torch.no_grad():
        features = {k: f for k, _, f in draft.training_steps(parts, ids, hidden, K, aux)}
    worst = 0.0
    for b in range(ids.shape[0]):
        for n in [0, 1, 2, 5, 16 - K - 2]:
            forced = lambda k, logits, b=b, n=n: ids[b : b + 1, n + 2 + k]  # noqa: E731
            inputs = drafting_inputs(draft, parts, ids[b : b + 1], hidden[b : b + 1], aux[b : b + 1], n)
            _, logits = draft.propose(inputs, K, forced)
            for k in range(K):
                with torch.no_grad():
                    expected = draft.head_logits(k, None, features[k][b, n + 1 + k], parts)
                drafted = torch.isfinite(expected)
                assert drafted.sum() == 87 and torch.equal(drafted, torch.isfinite(logits[0, k]))
                worst = max(worst, float((expected[drafted] - logits[0, k][drafted]).abs().max()))
    assert worst < 1e-4, f"training and drafting logits differ by {worst}"


def test_draft_vocabulary_keeps_the_lm_head_rows_and_only_shrinks(llama_target, llama_dir):
    draft = randomised_eagle3(llama_target, llama_dir, 2)
    rows = draft.lm_head.weight.detach().clone()
    draft.set_draft_vocab(torch.tensor([40, 7, 9]))
    assert draft.draft_vocab.tolist() == [7, 9, 40] and draft.config.draft_vocab_size == 3
    torch.testing.assert_close(draft.lm_head.weight, rows[[7, 9, 40]])
    with pytest.raises(ChimeraConfigError, match="token id 8 is not in this EAGLE-3 draft's vocabulary"):
        draft.set_draft_vocab(torch.tensor([7, 8]))
    with pytest.raises(ChimeraConfigError, match="must lie in"):
        draft.set_draft_vocab(torch.tensor([7, 10**6]))


def test_objective_needs_the_aux_states_and_trains_no_feature_regression(llama_target, llama_dir):
    draft = randomised_eagle3(llama_target, llama_dir, 2)
    objective = ChimeraObjective(draft, TargetParts.from_model(llama_target), LossWeights.geometric(2))
    ids = torch.randint(5, 100, (2, 12))
    hidden, aux = final_and_aux_hidden(llama_target, ids, draft.config.aux_layers)
    labels = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(ChimeraConfigError, match=r"layers \[0, 1, 2\]"):
        objective(ids, hidden, labels)
    loss, metrics = objective(ids, hidden, labels, None, aux)
    assert loss.requires_grad and {"ce_0", "ce_1"} <= set(metrics) and not any(m.startswith("mse") for m in metrics)


@pytest.fixture(scope="module")
def eagle3_run(trained_pair, tmp_path_factory):
    """An EAGLE-3 draft distilled from the tiny target's data by the trainer, with a hidden-state
    cache (which then holds the aux states) and a draft vocabulary."""
    target_dir = trained_pair[0]
    out = tmp_path_factory.mktemp("eagle3")
    return train(
        TrainArgs(
            target=str(target_dir),
            data=str(target_dir.parent / "data.jsonl"),
            out=str(out / "run"),
            head_type="eagle3",
            num_heads=3,
            draft_vocab_size=24,
            hidden_cache=str(out / "cache.safetensors"),
            steps=60,
            batch_size=16,
            lr=3e-3,
            save_every=1000,
            progress=False,
        )
    )


def test_trainer_learns_an_eagle3_draft_from_its_cache(eagle3_run):
    log = read_train_log(eagle3_run)
    assert log[-1]["top1_0"] > 0.5 and log[-1]["loss"] < log[0]["loss"] / 2
    draft = DraftModel.from_pretrained(eagle3_run)
    assert isinstance(draft, Eagle3Draft) and draft.config.draft_vocab_size == 24
    cache = load_file(str(eagle3_run.parent / "cache.safetensors"))
    assert cache["aux"].shape == (cache["hidden"].shape[0], 3 * cache["hidden"].shape[1])


def test_export_writes_the_speculators_eagle3_format(eagle3_run, tmp_path):
    assert cli.main(["export-eagle3", "--draft", str(eagle3_run), "--out", str(tmp_path), "--dtype", "float32"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 24
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2] and config["norm_before_residual"] is True
    weights = load_file(str(tmp_path / "model.safetensors"))
    draft = Eagle3Draft.from_pretrained(eagle3_run)
    assert torch.equal(weights["d2t"] + torch.arange(24), draft.draft_vocab)
    assert torch.equal(weights["layers.0.self_attn.q_proj.weight"], draft.layer.self_attn.q_proj.weight)
    assert weights["fc.weight"].shape == (draft.config.hidden_size, 3 * draft.config.hidden_size)
    assert not any("embed_tokens" in name for name in weights)  # vLLM shares the target's


def greedy_chain_counts(target, draft: Eagle3Draft, sequence: list[int], prompt_len: int, k: int, max_tokens: int):
    """(draft tokens, accepted tokens) of greedy chain drafting by this project's model over one
    request whose greedy output (with K tokens beyond max_tokens) is sequence[prompt_len:]."""
    parts = TargetParts.from_model(target)
    ids = torch.tensor([sequence])
    hidden, aux = final_and_aux_hidden(target, ids, draft.config.aux_layers)
    n, produced, drafted, accepted = prompt_len - 1, 1, 0, 0
    while produced < max_tokens:
        tokens, _ = draft.propose(drafting_inputs(draft, parts, ids, hidden, aux, n), k)
        truth = sequence[n + 2 : n + 2 + k]
        a = next((i for i, (d, t) in enumerate(zip(tokens[0].tolist(), truth)) if d != t), k)
        drafted, accepted = drafted + k, accepted + a
        produced, n = produced + a + 1, n + a + 1
    return drafted, accepted


def _untouched_by_the_plugin(worker) -> dict:
    from chimera_vllm.vllm.patches import patched

    runner = worker.model_runner
    instance_patches = [
        name for obj in (runner, runner.rejection_sampler) for name, v in vars(obj).items() if patched(v)
    ]
    return {
        "model": type(runner.drafter.model).__name__,
        "is_chimera": runner.drafter.is_chimera,
        "instance_patches": instance_patches,
    }


def test_vllms_eagle3_proposer_serves_the_export_lossless_drafting_as_the_model(
    trained_pair, eagle3_run, tmp_path, monkeypatch
):
    """The export as `vllm serve EXPORT` takes it (the speculators route: its config names the
    target): vLLM's own Eagle3LlamaForCausalLM and EAGLE proposer, none of the plugin's per-engine
    changes; greedy outputs equal the target's alone (the reference decoder's), and vLLM's draft and
    acceptance counts equal those of this project's model drafting the same chains."""
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams

    from chimera_vllm.vllm.engine import SpecCounters, close_llm

    target_dir, target, tokenizer, _, _ = trained_pair
    assert cli.main(["export-eagle3", "--draft", str(eagle3_run), "--out", str(tmp_path), "--dtype", "float32"]) == 0
    draft = Eagle3Draft.from_pretrained(eagle3_run, target.config)
    prompts = grammar_prompts(tokenizer, 8, seed=5)
    K, max_tokens = 3, 24
    continuations, _ = SpeculativeDecoder(target).generate(prompts, max_tokens + K + 1)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the engine inspection below
    engine = dict(dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, seed=0)
    llm = LLM(model=str(tmp_path), disable_log_stats=False, kv_cache_memory_bytes=64 << 20, **engine)
    try:
        spec = llm.llm_engine.vllm_config.speculative_config
        assert (spec.method, spec.num_speculative_tokens) == ("eagle3", K)
        (inspected,) = llm.collective_rpc(_untouched_by_the_plugin)
        assert inspected == {"model": "Eagle3LlamaForCausalLM", "is_chimera": False, "instance_patches": []}
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [c[:max_tokens] for c in continuations]
        got = SpecCounters.read(llm)
    finally:
        close_llm(llm)
    expected = [
        greedy_chain_counts(target, draft, p + c, len(p), K, max_tokens) for p, c in zip(prompts, continuations)
    ]
    assert got.accepted_tokens > got.draft_tokens / 2  # trained: most drafts accepted
    assert (got.draft_tokens, got.accepted_tokens) == tuple(map(sum, zip(*expected)))
