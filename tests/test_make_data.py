"""Self-distillation data: chat-rendered prompts, the target's answers, resume, held-out check."""

from __future__ import annotations

import contextlib
import json
from collections import Counter

import pytest

from chimera_vllm.data import DATA_DIR
from chimera_vllm.data.prompts import encode_chat, read_prompts
from chimera_vllm.reference.target import load_target, load_tokenizer
from chimera_vllm.training.data import read_sequences
from chimera_vllm.training.make_data import (
    HeldOutPromptError,
    MakeDataArgs,
    MakePromptsArgs,
    heldout_turns,
    make_data,
    make_prompts,
    user_turn_prefix,
)

from .conftest import hf_greedy

DATA = DATA_DIR
TRAINING_SETS = [
    "gsm8k_train.jsonl",
    "self_instruct_seed_tasks.jsonl",
    "self_instruct_user_oriented.jsonl",
    "humaneval.jsonl.gz",
    "smollm2_written_prompts.jsonl",
    "smollm2_written_prompts_steered.jsonl",
    "smollm2_written_prompts_steered_seed9.jsonl.gz",
    "smollm2_written_prompts_steered_seed10.jsonl.gz",
]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("md") / "prompts.jsonl"
    lines = [{"question": f"what is {i} plus {i}?"} for i in range(7)] + [
        {"instruction": "Say hi.", "instances": [{"input": "to Bob"}]}
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _args(llama_dir, prompt_file, out, **kw):
    return MakeDataArgs(
        target=str(llama_dir),
        prompts=[str(prompt_file)],
        out=str(out),
        max_new_tokens=12,
        batch_size=3,
        dtype="float32",
        progress=False,
        **kw,
    )


def test_records_are_chat_prompts_and_the_targets_greedy_answers(llama_dir, prompt_file, tmp_path):
    out = make_data(_args(llama_dir, prompt_file, tmp_path / "d.jsonl"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    tokenizer, target = load_tokenizer(str(llama_dir)), load_target(str(llama_dir))
    texts = {p.source: p.text for p in read_prompts(prompt_file)}
    for r in records:
        prompt = r["input_ids"][: r["prompt_length"]]
        assert prompt == encode_chat(tokenizer, texts[r["source"]])
        assert r["input_ids"][r["prompt_length"] :] == hf_greedy(target, [prompt], 12, tokenizer.eos_token_id)[0]
    assert any(texts[r["source"]] == "Say hi.\n\nto Bob" for r in records)
    assert len(read_sequences(out, vocab_size=len(tokenizer))) == 8  # the trainer reads it


def test_interrupted_run_resumes_to_the_same_file(llama_dir, prompt_file, tmp_path):
    whole = make_data(_args(llama_dir, prompt_file, tmp_path / "whole.jsonl", temperature=0.8, seed=3)).read_text()
    part = tmp_path / "part.jsonl"
    lines = whole.splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10])  # killed while writing line 5
    make_data(_args(llama_dir, prompt_file, part, temperature=0.8, seed=3))
    assert part.read_text() == whole


def test_rerun_of_a_finished_file_keeps_its_last_short_batch(llama_dir, prompt_file, tmp_path, monkeypatch):
    """8 prompts in batches of 3: the last batch has 2 lines, and a rerun must neither drop nor
    redo it (concurrent reruns once appended it again and again)."""
    out = make_data(_args(llama_dir, prompt_file, tmp_path / "d.jsonl"))
    whole = out.read_text()

    def no_engine(args):
        raise AssertionError("a finished file was generated again")

    monkeypatch.setattr("chimera_vllm.training.make_data._engine", no_engine)
    make_data(_args(llama_dir, prompt_file, out))
    assert out.read_text() == whole and len(whole.splitlines()) == 8


def test_limit_takes_a_seeded_sample(llama_dir, prompt_file, tmp_path):
    a = make_data(_args(llama_dir, prompt_file, tmp_path / "a.jsonl", limit=3, seed=1)).read_text()
    b = make_data(_args(llama_dir, prompt_file, tmp_path / "b.jsonl", limit=3, seed=1)).read_text()
    assert a == b and len(a.splitlines()) == 3


def test_max_prompt_tokens_skips_exactly_the_longer_prompts(llama_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    texts = ["hi", "word " * 40, "add 2 and 2", "x " * 60]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    tokenizer = load_tokenizer(str(llama_dir))
    lengths = {t: len(encode_chat(tokenizer, t)) for t in texts}
    limit = sorted(lengths.values())[1]  # the two shortest prompts fit
    out = make_data(_args(llama_dir, path, tmp_path / "d.jsonl", max_prompt_tokens=limit))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt_length"] for r in records) == sorted(n for n in lengths.values() if n <= limit)


@pytest.mark.parametrize("heldout", ["mt_bench_questions.jsonl", "heldout_other_kinds.jsonl"])
def test_a_heldout_turn_is_refused_as_training_prompt(llama_dir, tmp_path, heldout):
    turn = sorted(heldout_turns((DATA / heldout,)))[0]
    path = tmp_path / "leak.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": turn}) + "\n")
    with pytest.raises(HeldOutPromptError, match="leak.jsonl:2: this prompt is a turn of a held-out evaluation set"):
        make_data(_args(llama_dir, path, tmp_path / "d.jsonl"))


def test_shipped_training_prompts_never_equal_a_heldout_turn():
    turns = heldout_turns()
    assert len(turns) == 160 + 48  # MT-bench's two turns of 80 questions; 48 requests of other kinds
    evaluation = {"mt_bench_questions.jsonl", "heldout_other_kinds.jsonl", "long_context_prompts.jsonl"}
    shipped = {p.name for p in DATA.glob("*.jsonl*")} - evaluation
    assert shipped == set(TRAINING_SETS), "a prompt file in data/ that this test does not check"
    prompts = [p for name in TRAINING_SETS for p in read_prompts(DATA / name)]
    assert len(prompts) == 7473 + 175 + 252 + 164 + 6585 + 6755 + 13403 + 13427
    assert not [p.source for p in prompts if p.text.strip() in turns]


def test_the_heldout_requests_of_other_kinds_hold_12_of_each_kind():
    path = DATA / "heldout_other_kinds.jsonl"
    categories = Counter(json.loads(line)["category"] for line in path.read_text().splitlines())
    assert categories == {"summary": 12, "translation": 12, "passage-qa": 12, "math-word-problem": 12}
    assert len({p.text for p in read_prompts(path)}) == 48


def _prompt_args(llama_dir, out, **kw):
    return MakePromptsArgs(
        target=str(llama_dir), out=str(out), max_new_tokens=64, batch_size=4, dtype="float32", progress=False, **kw
    )


def test_user_turn_prefix_is_the_chat_template_up_to_the_users_text(llama_dir):
    tokenizer = load_tokenizer(str(llama_dir))
    prefix = user_turn_prefix(tokenizer)
    assert tokenizer.decode(prefix) == "<|im_start|>user\n"
    assert encode_chat(tokenizer, "hello")[: len(prefix)] == prefix


def test_make_prompts_keeps_distinct_finished_samples_of_the_user_turn(llama_dir, tmp_path, monkeypatch):
    """The engine is fed the user-turn prefix; only samples that end in EOS, are long enough
    and are new (after case/space folding, MT-bench turns included) become prompts."""
    tokenizer = load_tokenizer(str(llama_dir))
    eos = tokenizer.eos_token_id
    heldout = sorted(heldout_turns())[0]
    samples = ["Write a poem about rain.", "write a  POEM about rain.", "Too short", "No end: a long request", heldout]
    fed = []

    def engine(prompts, first_index, stop):
        fed.extend(prompts)
        out = []
        for i in range(first_index, first_index + len(prompts)):
            ids = tokenizer(samples[i], add_special_tokens=False).input_ids
            out.append(ids if i == 3 else ids + [eos])  # sample 3 ran out of new tokens
        return out

    monkeypatch.setattr("chimera_vllm.training.make_data._engine", lambda args: contextlib.nullcontext(engine))
    out = make_prompts(_prompt_args(llama_dir, tmp_path / "p.jsonl", count=5, min_chars=12))
    assert fed == [user_turn_prefix(tokenizer)] * 5
    prompts = read_prompts(out)
    assert [p.text for p in prompts] == ["Write a poem about rain."] and prompts[0].chat


def test_make_prompts_starts_each_request_with_its_opener(llama_dir, tmp_path, monkeypatch):
    """Sample i is fed the user-turn prefix and opener i mod n; the prompt is the opener and what followed."""
    tokenizer = load_tokenizer(str(llama_dir))
    eos = tokenizer.eos_token_id
    openers = tmp_path / "openers.txt"
    openers.write_text("Explain\n\nWrite a\n")
    fed = []

    def engine(prompts, first_index, stop):
        fed.extend(prompts)
        return [
            tokenizer(f" request number {i}.", add_special_tokens=False).input_ids + [eos]
            for i in range(first_index, first_index + len(prompts))
        ]

    monkeypatch.setattr("chimera_vllm.training.make_data._engine", lambda args: contextlib.nullcontext(engine))
    out = make_prompts(_prompt_args(llama_dir, tmp_path / "p.jsonl", count=5, min_chars=8, openers=str(openers)))
    prefix = user_turn_prefix(tokenizer)
    opener_ids = [tokenizer(o, add_special_tokens=False).input_ids for o in ("Explain", "Write a")]
    assert fed == [prefix + opener_ids[i % 2] for i in range(5)]
    expected = [f"{('Explain', 'Write a')[i % 2]} request number {i}." for i in range(5)]
    assert [p.text for p in read_prompts(out)] == expected
    assert "opener 'Write a'" in out.read_text().splitlines()[1]


@pytest.mark.parametrize(("text", "named"), [(None, "no openers file at"), ("\n \n", r"no openers \(one a line\)")])
def test_make_prompts_refuses_a_missing_or_empty_openers_file(llama_dir, tmp_path, text, named):
    openers = tmp_path / "openers.txt"
    if text is not None:
        openers.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=named):
        make_prompts(_prompt_args(llama_dir, tmp_path / "p.jsonl", count=2, openers=str(openers)))
    assert not (tmp_path / "p.jsonl").exists()  # refused before writing anything


def test_make_prompts_samples_the_target_and_resumes_to_the_same_file(llama_dir, tmp_path):
    whole = make_prompts(_prompt_args(llama_dir, tmp_path / "whole.jsonl", count=12, min_chars=1, seed=5))
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) >= 2 and len(set(lines)) == len(lines)
    part = tmp_path / "part.jsonl"
    make_prompts(_prompt_args(llama_dir, part, count=4, min_chars=1, seed=5))  # the first batch
    part.write_text(part.read_text() + '{"turns": ["cut sh')  # killed while writing the second
    make_prompts(_prompt_args(llama_dir, part, count=12, min_chars=1, seed=5))
    assert part.read_text() == whole.read_text()
