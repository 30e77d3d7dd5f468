"""The chimera-vllm command line: generate's JSON, prompt files, errors with file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chimera_vllm.cli import main
from chimera_vllm.data.prompts import PromptFileError, encode_prompts
from chimera_vllm.reference.target import load_tokenizer


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text('{"turns": ["What is a cat?", "And a dog?"]}\n\n{"prompt": "the red cat"}\n{"prompt": "x"}\n')
    return path


def test_generate_json_with_and_without_draft(capsys, llama_dir, prompt_file, tmp_path):
    assert main(["init-draft", "--target", str(llama_dir), "--out", str(tmp_path / "d"), "--num-heads", "3"]) == 0
    capsys.readouterr()
    common = ["generate", "--target", str(llama_dir), "--prompts", str(prompt_file), "--max-new-tokens", "12", "--json"]
    plain = run_json(capsys, *common)
    spec = run_json(capsys, *common, "--draft", str(tmp_path / "d"), "--num-speculative-tokens", "2")
    assert [o["prompt_index"] for o in spec["outputs"]] == [0, 1, 2]
    assert [o["token_ids"] for o in spec["outputs"]] == [o["token_ids"] for o in plain["outputs"]]
    assert all(isinstance(o["text"], str) for o in spec["outputs"])
    stats = spec["stats"]
    assert set(stats) == {
        "target_steps",
        "draft_tokens",
        "accepted_tokens",
        "mean_accepted_length",
        "acceptance_by_position",
        "wall_s",
        "output_tokens_per_s",
    }
    assert len(stats["acceptance_by_position"]) == 2
    assert stats["draft_tokens"] == 2 * stats["target_steps"]
    assert stats["mean_accepted_length"] == 1 + stats["accepted_tokens"] / stats["target_steps"]


def test_chat_turns_use_the_chat_template(llama_dir, prompt_file):
    tokenizer = load_tokenizer(str(llama_dir))
    chat, raw, _ = encode_prompts(prompt_file, tokenizer)
    assert tokenizer.decode(chat) == "<|im_start|>user\nWhat is a cat?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(raw) == "the red cat"


def test_text_prompt_file_one_prompt_per_line(llama_dir, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\n\nsecond {not json}\n")
    tokenizer = load_tokenizer(str(llama_dir))
    assert [tokenizer.decode(p) for p in encode_prompts(path, tokenizer)] == ["first line", "second {not json}"]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"prompt": "ok"}\n{"prompt": 3}\n', 'p.jsonl:2: expected {"prompt": str}, {"turns": [str, ...]}'),
        ('{"prompt": "ok"}\n\n{"turns": [\n', "p.jsonl:3: not valid JSON"),
        ('{"prompt": ""}\n', "p.jsonl:1: the prompt is empty after tokenisation"),
        ("\n\n", "p.jsonl: no prompts"),
    ],
)
def test_malformed_prompt_file_is_reported_with_file_and_line(capsys, llama_dir, tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match="p.jsonl"):
        encode_prompts(path, load_tokenizer(str(llama_dir)))
    code = main(["generate", "--target", str(llama_dir), "--prompts", str(path), "--max-new-tokens", "4"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_console_script_reports_errors_without_a_traceback(llama_dir, tmp_path):
    exe = Path(sys.executable).parent / "chimera-vllm"
    assert exe.is_file(), "the chimera-vllm console script is installed by setup.py"
    result = subprocess.run(
        [
            str(exe),
            "generate",
            "--target",
            str(llama_dir),
            "--draft",
            str(tmp_path / "missing"),
            "--prompts",
            str(tmp_path / "missing.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "chimera-vllm: error: no prompts file at" in result.stderr
    assert "Traceback" not in result.stderr


def test_draft_vocab_keeps_the_most_frequent_response_tokens(capsys, llama_dir, tmp_path):
    from chimera_vllm.model.draft import ChimeraDraft
    from chimera_vllm.training.data import Sequence, write_sequences

    assert main(["init-draft", "--target", str(llama_dir), "--out", str(tmp_path / "d")]) == 0
    # Prompt tokens (9) never count; in the responses 7 > 8 > 5 > 6 by frequency.
    data = tmp_path / "data.jsonl"
    write_sequences(data, [Sequence([9, 9, 9, 7, 7, 7, 8, 8, 5], 3), Sequence([9, 9, 7, 8, 6, 5], 2)])
    capsys.readouterr()
    assert main(["draft-vocab", "--draft", str(tmp_path / "d"), "--data", str(data), "--size", "3"]) == 0
    assert "3 tokens cover 90.0% of the response tokens" in capsys.readouterr().out
    draft = ChimeraDraft.from_pretrained(tmp_path / "d")
    assert draft.draft_vocab.tolist() == [5, 7, 8] and draft.config.draft_vocab_size == 3
    assert main(["draft-vocab", "--draft", str(tmp_path / "d"), "--data", str(data), "--size", "100000"]) == 2
    assert "--size must be in 1..105 (the target's vocabulary), got 100000" in capsys.readouterr().err


def test_plot_training_draws_every_run_and_names_a_folder_without_a_log(capsys, tmp_path):
    for name, top1 in (("chimera", 0.5), ("medusa", 0.3)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 9.0 - s, "ce_0": 3.0 - s, "top1_0": top1, "top1_1": top1 / 2} for s in (1, 2)]
        (tmp_path / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "curves.png"
    assert main(["plot-training", str(tmp_path / "chimera"), str(tmp_path / "medusa"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot-training", str(tmp_path / "chimera"), str(tmp_path), "--out", str(png)]) == 2
    assert f"no training log at {tmp_path / 'train_log.jsonl'}" in capsys.readouterr().err


def test_init_draft_takes_the_encoder_width_and_names_a_bad_one(capsys, llama_dir, tmp_path):
    from safetensors.torch import load_file

    from chimera_vllm.model.draft import ChimeraDraft

    out = tmp_path / "wide"
    assert main(["init-draft", "--target", str(llama_dir), "--out", str(out), "--intermediate-size", "96"]) == 0
    hidden = ChimeraDraft.from_pretrained(out).config.target.hidden_size
    assert load_file(out / "model.safetensors")["encoder.mlp.up_proj.weight"].shape == (96, hidden)
    bad = ["init-draft", "--target", str(llama_dir), "--out", str(tmp_path / "bad"), "--intermediate-size", "0"]
    assert main(bad) == 2
    assert "intermediate_size must be >= 1, got 0" in capsys.readouterr().err


def test_train_takes_a_shipped_draft_name_for_init_draft_and_refuses_to_reshape_it(capsys, tmp_path):
    """Nothing loads before the check: neither the target nor the data exists here."""
    from chimera_vllm.config import ChimeraConfig
    from chimera_vllm.drafts import shipped_drafts

    name, path = next(iter(shipped_drafts().items()))
    heads = ChimeraConfig.load(path).num_heads
    cmd = ["train", "--target", "no-such-target", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]
    assert main([*cmd, "--init-draft", name, "--num-heads", str(heads + 1)]) == 2
    expected = f"num_heads {heads + 1} shapes a fresh draft: the draft at {path} has num_heads {heads}"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
