"""The training objective: train/inference parity, learning, checkpoints and resume, DDP, data errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chimera_vllm.model.base import ChimeraCheckpointError, TargetParts
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.draft import ChimeraDraft, shift_right, verified_context_mask
from chimera_vllm.model.medusa import MedusaDraft
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import final_hidden, load_target
from chimera_vllm.testing.tiny import grammar_prompts
from chimera_vllm.training.data import (
    DataFormatError,
    Sequence,
    frequent_response_tokens,
    read_sequences,
    write_sequences,
)
from chimera_vllm.training.hidden_cache import HiddenCache
from chimera_vllm.training.objective import (
    ChimeraObjective,
    GreedyLabels,
    LossWeights,
    greedy_next_tokens,
)
from chimera_vllm.training.trainer import TrainArgs, train

from .conftest import draft_after


def randomised_draft(target, target_dir, num_heads, trigram_mlp="resblock", head_type="residual", seed=0):
    """A draft whose every weight matters (fresh drafts have zero-initialised residual branches)."""
    draft = init_draft(target, str(target_dir), num_heads, seed, trigram_mlp, head_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return draft


def test_verified_context_mask_and_shift():
    m = verified_context_mask(5, 2)  # query p sees h_j for j <= p-3
    assert m[4].tolist() == [True, True, False, False, False]
    assert not m[:3].any()  # p <= 2 has no verified context (no anchor) at step 2
    x = torch.arange(6.0).view(1, 1, 3, 2)
    assert shift_right(x).tolist() == [[[[0, 0], [0, 1], [2, 3]]]]


@pytest.mark.parametrize(
    "trigram_mlp,head_type", [("resblock", "residual"), ("linear", "full"), ("resblock", "medusa")]
)
def test_training_forward_equals_teacher_forced_drafting(tiny_target_dir, trigram_mlp, head_type):
    """Step k's training logits at every position equal the drafting loop's, fed the true tokens."""
    target = load_target(str(tiny_target_dir))
    K = 4
    draft = randomised_draft(target, tiny_target_dir, K, trigram_mlp, head_type)
    parts = TargetParts.from_model(target)
    ids = torch.randint(5, target.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    hidden = final_hidden(target, ids)
    with torch.no_grad():
        train_out = {k: (h_hat, anchor) for k, h_hat, anchor in draft.training_steps(parts, ids, hidden, K)}
    worst = 0.0
    for b in range(ids.shape[0]):  # the drafting loop is no_grad; so is this comparison
        for n in [0, 1, 2, 5, 9, 16 - K - 2]:  # drafting starts after the target verified x_0..x_{n+1}
            forced = lambda k, logits, b=b, n=n: ids[b : b + 1, n + 2 + k]  # noqa: E731
            _, logits = draft_after(draft, parts, ids[b : b + 1], hidden[b : b + 1], n, K, forced)
            for k in range(K):
                h_hat, anchor = train_out[k]
                p = n + 1 + k
                with torch.no_grad():
                    expected = draft.head_logits(k, None if h_hat is None else h_hat[b, p], anchor[b, p], parts)
                worst = max(worst, float((expected - logits[0, k]).abs().max()))
    assert worst < 1e-4, f"training and drafting logits differ by {worst}"


def test_objective_trains_only_positions_with_an_anchor_and_a_label(llama_target, llama_dir):
    draft = randomised_draft(llama_target, llama_dir, 3)
    objective = ChimeraObjective(draft, TargetParts.from_model(llama_target), LossWeights.geometric(3))
    ids = torch.randint(5, 100, (2, 12))
    hidden = final_hidden(llama_target, ids)
    labels = torch.zeros(2, 12, dtype=torch.bool)
    labels[:, 3] = True  # only x_3 is a label: steps 0 and 1 can predict it (p=2 >= k+1), step 2 cannot
    loss, metrics = objective(ids, hidden, labels)
    assert loss.requires_grad and torch.isfinite(loss)
    assert "ce_0" in metrics and "ce_1" in metrics and "ce_2" not in metrics


def test_training_raises_mean_accepted_length(trained_pair):
    """From ~1 token per step untrained to >= 2 after a short distillation run."""
    _, target, tokenizer, untrained, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 16, seed=123)  # held out: seed 7 made the training prompts
    _, before = SpeculativeDecoder(target, untrained, 4).generate(prompts, 48)
    _, after = SpeculativeDecoder(target, trained, 4).generate(prompts, 48)
    assert before.to_dict()["mean_accepted_length"] < 1.2
    assert after.to_dict()["mean_accepted_length"] >= 2.0


@pytest.fixture(scope="module")
def small_data(llama_target, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(5, 100, (int(n),), generator=g).tolist(), 3) for n in range(8, 40)]
    path = tmp_path_factory.mktemp("data") / "seqs.jsonl"
    write_sequences(path, seqs)
    return path


def _args(llama_dir, data, out, **kw):
    base = dict(
        target=str(llama_dir),
        data=str(data),
        out=str(out),
        num_heads=3,
        steps=6,
        batch_size=4,
        save_every=3,
        log_every=1,
        progress=False,
    )
    base.update(kw)
    return TrainArgs(**base)


def test_resume_continues_exactly(llama_dir, small_data, tmp_path):
    """6 steps in one run == 3 steps, stop, resume for 3 more (weights, optimizer and data order)."""
    full = train(_args(llama_dir, small_data, tmp_path / "full"))
    train(_args(llama_dir, small_data, tmp_path / "split", steps=3, save_every=3))
    resumed = train(_args(llama_dir, small_data, tmp_path / "split"))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4, 5, 6]
    assert (full / "loss.png").stat().st_size > 0


def test_ddp_two_cpu_processes(llama_dir, small_data, tmp_path):
    """torchrun with 2 gloo processes trains and writes one draft that loads."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "chimera_vllm.cli",
        "train",
        "--target",
        str(llama_dir),
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--num-heads",
        "2",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    draft = ChimeraDraft.from_pretrained(out)
    assert draft.num_heads == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ('{"tokens": [1, 2]}', 'expected {"input_ids"'),
        ('{"input_ids": [5]}', "a sequence needs at least 2 tokens"),
        ('{"input_ids": [5, 100000]}', "token id 100000 is outside the vocabulary"),
        ('{"input_ids": [5, 6], "prompt_length": 2}', "prompt_length=2 must be in"),
    ],
)
def test_malformed_training_data_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [5, 6, 7]}\n' + line + "\n")
    with pytest.raises(DataFormatError) as err:
        read_sequences(path, vocab_size=1000)
    assert f"bad.jsonl:2: {message}" in str(err.value)


def test_medusa_baseline_trains_and_decodes_losslessly(trained_pair, tmp_path):
    """The baseline: heads over h_a only (no trigram, no encoder), same trainer, same decoder."""
    target_dir, target, tokenizer, _, _ = trained_pair
    data = target_dir.parent / "data.jsonl"
    run = train(
        TrainArgs(
            target=str(target_dir),
            data=str(data),
            out=str(tmp_path / "medusa"),
            head_type="medusa",
            steps=40,
            batch_size=16,
            lr=3e-3,
            save_every=1000,
            log_every=5,
            progress=False,
        )
    )
    medusa = MedusaDraft.from_pretrained(run, target.config)
    assert set(medusa.state_dict()) == {"heads.weight", "heads.bias"}
    with pytest.raises(ChimeraCheckpointError, match="holds a 'medusa' draft .MedusaDraft., not a ChimeraDraft"):
        ChimeraDraft.from_pretrained(run, target.config)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["ce_0"] < log[0]["ce_0"] and "mse_0" not in log[-1]
    prompts = grammar_prompts(tokenizer, 6, seed=77)
    plain, _ = SpeculativeDecoder(target).generate(prompts, 32)
    outputs, stats = SpeculativeDecoder(target, medusa, 4).generate(prompts, 32)
    assert outputs == plain


def test_position_subsampling_is_a_seeded_subset(llama_target, llama_dir):
    draft = init_draft(llama_target, str(llama_dir), 2)
    objective = ChimeraObjective(draft, TargetParts.from_model(llama_target), LossWeights.geometric(2), max_positions=4)
    sel = torch.zeros(2, 12, dtype=torch.bool)
    sel[0, 3:9] = sel[1, 5:11] = True
    objective.reseed(7)
    first = objective._subsample(sel)
    objective.reseed(7)
    assert torch.equal(objective._subsample(sel), first)
    assert int(first.sum()) == 4 and not (first & ~sel).any()
    few = torch.zeros_like(sel)
    few[0, 4] = True
    assert torch.equal(objective._subsample(few), few)


def test_kl_term_is_zero_only_for_a_draft_that_matches_the_target(llama_target, llama_dir):
    """KL(target || draft) at query p compares the draft's step-k distribution with the target's at p."""
    draft = randomised_draft(llama_target, llama_dir, 2)
    parts = TargetParts.from_model(llama_target)
    ids = torch.randint(5, 100, (2, 12))
    hidden = final_hidden(llama_target, ids)
    labels = torch.ones(2, 12, dtype=torch.bool)
    with_kl = ChimeraObjective(draft, parts, LossWeights.geometric(2, kl=0.5))
    without = ChimeraObjective(draft, parts, LossWeights.geometric(2))
    loss_kl, metrics = with_kl(ids, hidden, labels)
    loss, _ = without(ids, hidden, labels)
    assert metrics["kl_0"] > 0 and metrics["kl_1"] > 0
    expected = loss.item() + 0.5 * (metrics["kl_0"] + 0.8 * metrics["kl_1"])
    assert loss_kl.item() == pytest.approx(expected, rel=1e-5)


def test_draft_vocabulary_loss_is_cross_entropy_over_its_tokens(llama_target, llama_dir):
    """With a draft vocabulary, head k's CE is over those tokens only; labels outside it get no loss."""
    draft = randomised_draft(llama_target, llama_dir, 1)
    draft.set_draft_vocab(torch.arange(5, 60))
    parts = TargetParts.from_model(llama_target)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    hidden = final_hidden(llama_target, ids)
    labels = torch.ones(2, 12, dtype=torch.bool)
    loss, metrics = ChimeraObjective(draft, parts, LossWeights((1.0,), mse=0.0))(ids, hidden, labels)
    ((_, h_hat, anchor),) = draft.training_steps(parts, ids, hidden, 1)
    expected = []
    for b in range(2):
        for p in range(1, 11):
            if ids[b, p + 1] < 60:  # x_{p+1} is a draft-vocabulary token
                logits = draft.head_logits(0, h_hat[b, p], anchor[b, p], parts)[5:60]
                expected.append(torch.nn.functional.cross_entropy(logits, ids[b, p + 1] - 5))
    assert 0 < len(expected) < 20
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert metrics["ce_0"] == pytest.approx(loss.item())


def test_a_continued_draft_keeps_its_vocabulary_unless_asked_and_sizes_are_checked(
    capsys, llama_dir, small_data, tmp_path
):
    first = train(_args(llama_dir, small_data, tmp_path / "first", steps=1, draft_vocab_size=30))
    vocab = load_file(first / "model.safetensors")["draft_vocab"]
    kept = train(_args(llama_dir, small_data, tmp_path / "kept", steps=1, init_draft=str(first)))
    assert torch.equal(load_file(kept / "model.safetensors")["draft_vocab"], vocab)
    counts = torch.bincount(torch.tensor([t for s in read_sequences(small_data) for t in s.input_ids[3:]]))
    share = float(counts[vocab].sum() / counts.sum())
    assert f"draft vocabulary (--init-draft's): 30 tokens cover {share:.1%} of the responses" in capsys.readouterr().out
    other = tmp_path / "other.jsonl"  # other answers: the vocabulary asked for is the new data's
    write_sequences(other, [Sequence([9, 9, 9] + list(range(60, 80)) * 2, 3)])
    again = train(_args(llama_dir, other, tmp_path / "again", steps=1, init_draft=str(first), draft_vocab_size=20))
    assert load_file(again / "model.safetensors")["draft_vocab"].tolist() == list(range(60, 80))
    with pytest.raises(ValueError, match=r"a draft vocabulary of 21 tokens: .* hold only 20 distinct tokens"):
        train(_args(llama_dir, other, tmp_path / "too_many", steps=1, draft_vocab_size=21))


def test_hidden_cache_trains_like_the_live_target_and_is_reused(llama_dir, small_data, tmp_path):
    """--hidden-cache gives the weights of a run that calls the target every step; a second run reuses
    the file, and a changed data file rebuilds it. --draft-vocab-size picks the data's top tokens."""
    cache = tmp_path / "hidden.safetensors"
    live = train(_args(llama_dir, small_data, tmp_path / "live", draft_vocab_size=30))
    cached = train(_args(llama_dir, small_data, tmp_path / "cached", draft_vocab_size=30, hidden_cache=str(cache)))
    a, b = load_file(live / "model.safetensors"), load_file(cached / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    vocab, _ = frequent_response_tokens([str(small_data)], 128, 30)
    assert sorted(vocab.tolist()) == a["draft_vocab"].tolist()

    built = cache.stat().st_mtime_ns
    train(_args(llama_dir, small_data, tmp_path / "again", steps=1, hidden_cache=str(cache)))
    assert cache.stat().st_mtime_ns == built
    other = tmp_path / "other.jsonl"
    write_sequences(other, read_sequences(small_data)[:10])
    train(_args(llama_dir, other, tmp_path / "other", steps=1, hidden_cache=str(cache)))
    assert len(HiddenCache(cache).offsets) == 11


def test_greedy_next_tokens_are_the_targets_argmax_after_every_position(llama_target):
    ids = torch.randint(5, 100, (3, 17), generator=torch.Generator().manual_seed(5))
    hidden = final_hidden(llama_target, ids)
    expected = llama_target(ids).logits.argmax(-1)
    got = greedy_next_tokens(hidden, TargetParts.from_model(llama_target).lm_head_weight, chunk=7)
    assert torch.equal(got, expected)


def test_greedy_labels_are_computed_once_per_sequence(llama_target):
    """Later epochs get the first epoch's labels in any batch order and padding, without the
    hidden states (here zeros, whose own argmax would differ)."""
    lm_head = TargetParts.from_model(llama_target).lm_head_weight
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(6))
    hidden = final_hidden(llama_target, ids)
    labels = GreedyLabels(lm_head, lengths=[12, 9, 12])
    first = labels.batch([0, 1, 2], hidden)
    assert torch.equal(first, greedy_next_tokens(hidden, lm_head))
    again = labels.batch([2, 1], torch.zeros(2, 12, hidden.shape[-1]))
    assert torch.equal(again[0], first[2])
    assert torch.equal(again[1, :9], first[1, :9])


def test_target_labels_train_toward_the_targets_greedy_choice(llama_target, llama_dir, tmp_path):
    """On data that is not the target's greedy output, --labels target trains the heads on the
    target's argmax (the loss with those labels falls), and --labels data on the data's tokens."""
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(torch.randint(5, 100, (30,), generator=g).tolist(), 3) for _ in range(8)]
    data = tmp_path / "random.jsonl"
    write_sequences(data, seqs)
    ids = torch.tensor([s.input_ids for s in seqs])
    hidden = final_hidden(llama_target, ids)
    parts = TargetParts.from_model(llama_target)
    greedy = greedy_next_tokens(hidden, parts.lm_head_weight)[:, :-1]
    assert (greedy != ids[:, 1:]).float().mean() > 0.5  # random data: the labels differ

    def ce_against_greedy(run) -> float:
        draft = ChimeraDraft.from_pretrained(run, llama_target.config)
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, metrics = ChimeraObjective(draft, parts, LossWeights((1.0,), mse=0.0))(ids, hidden, mask, greedy)
        return metrics["ce_0"]

    kw = dict(num_heads=1, steps=30, batch_size=8, lr=3e-3, warmup_steps=2)
    start = train(_args(llama_dir, data, tmp_path / "start", **{**kw, "steps": 1, "lr": 1e-9}))
    on_target = train(_args(llama_dir, data, tmp_path / "target", labels="target", **kw))
    on_data = train(_args(llama_dir, data, tmp_path / "data", **kw))
    assert ce_against_greedy(on_target) < 0.7 * ce_against_greedy(start)
    assert ce_against_greedy(on_target) < ce_against_greedy(on_data)
    with pytest.raises(ValueError, match="labels 'argmax'"):
        train(_args(llama_dir, data, tmp_path / "bad", labels="argmax"))


def test_the_final_draft_is_saved_in_save_dtype_and_the_checkpoint_keeps_float32(llama_dir, small_data, tmp_path):
    out = train(_args(llama_dir, small_data, tmp_path / "bf16", steps=2, save_dtype="bfloat16"))
    final = load_file(out / "model.safetensors")
    checkpoint = load_file(out / "checkpoint" / "draft" / "model.safetensors")
    assert {t.dtype for t in final.values() if t.is_floating_point()} == {torch.bfloat16}
    assert {t.dtype for t in checkpoint.values() if t.is_floating_point()} == {torch.float32}
    for name, weight in checkpoint.items():  # the same weights, rounded
        torch.testing.assert_close(final[name].float(), weight.float(), rtol=1e-2, atol=1e-2, msg=name)
    with pytest.raises(ValueError, match="save_dtype 'int8': use one of float32, bfloat16, float16"):
        train(_args(llama_dir, small_data, tmp_path / "bad", save_dtype="int8"))


def test_a_fresh_draft_takes_the_encoder_width_and_a_continued_one_keeps_its_own(llama_dir, small_data, tmp_path):
    wide = train(_args(llama_dir, small_data, tmp_path / "wide", steps=1, intermediate_size=48))
    assert load_file(wide / "model.safetensors")["encoder.mlp.up_proj.weight"].shape[0] == 48
    continued = train(_args(llama_dir, small_data, tmp_path / "cont", steps=1, init_draft=str(wide)))
    assert load_file(continued / "model.safetensors")["encoder.mlp.up_proj.weight"].shape[0] == 48
    with pytest.raises(ValueError, match="intermediate_size 64 shapes a fresh draft: .* has intermediate_size 48"):
        train(_args(llama_dir, small_data, tmp_path / "bad", steps=1, init_draft=str(wide), intermediate_size=64))


@pytest.mark.parametrize(
    "option,value,kept",
    [("num_heads", 2, 3), ("trigram_mlp", "linear", "'resblock'"), ("head_type", "medusa", "'residual'")],
)
def test_a_continued_draft_refuses_a_shape_option_that_contradicts_it_before_loading(
    llama_dir, small_data, tmp_path, option, value, kept
):
    first = train(_args(llama_dir, small_data, tmp_path / "first", steps=1))  # 3 heads, resblock, residual
    args = _args("no-such-target", small_data, tmp_path / "bad", init_draft=str(first), **{option: value})
    with pytest.raises(ValueError, match=f"{option} {value!r} shapes a fresh draft: .* has {option} {kept}"):
        train(args)  # the target is not loaded first: its error would name no-such-target
    assert not (tmp_path / "bad").exists()
    same = train(_args(llama_dir, small_data, tmp_path / "same", steps=1, init_draft=str(first), num_heads=3))
    assert load_file(same / "model.safetensors")["heads.weight"].shape[0] == 3
