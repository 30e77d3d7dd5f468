"""`chimera-vllm recipe`: prompts the target writes, its answers, a draft of each kind trained on the
same data, evaluated in vLLM (lossless, τ from vLLM's counters) and described by a model card."""

from __future__ import annotations

import json

import pytest

from chimera_vllm import cli
from chimera_vllm.data.prompts import Prompt
from chimera_vllm.model.base import DraftModel
from chimera_vllm.recipe.args import RecipeArgs
from chimera_vllm.recipe.run import recipe, tau_by_category, torchrun_command, train_args
from chimera_vllm.reference.decoding import DecodeStats
from chimera_vllm.testing.tiny import synthetic_corpus


def chat_prompt_file(path, num_prompts: int, seed: int, categories: tuple[str, ...] = ()):
    """Prefixes of grammar lines as chat turns (make-data renders every prompt as a chat message),
    the categories given taking turns."""
    lines = [line[: 10 + i % 20] for i, line in enumerate(synthetic_corpus(num_prompts, seed))]
    records = [{"turns": [line]} | ({"category": categories[i % len(categories)]} if categories else {})
               for i, line in enumerate(lines)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_recipe_has_the_target_write_prompts_and_answer_them(llama_dir, tmp_path):
    args = RecipeArgs(
        target=str(llama_dir), out=str(tmp_path), num_prompts=64, max_new_tokens=8, data_engine="hf",
        data_dtype="float32", data_batch_size=32, stop_after="answers", progress=False,
    )  # fmt: skip
    recipe(args)
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert prompts and all(str(llama_dir) in p["source"] and "opener" in p["source"] for p in prompts)
    assert len(answers) == len(prompts) and all(len(a["input_ids"]) > a["prompt_length"] for a in answers)
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"prompts", "answers"}
    before = (tmp_path / "data.jsonl").stat().st_mtime_ns
    recipe(args)  # finished stages are not run again
    assert (tmp_path / "data.jsonl").stat().st_mtime_ns == before


def test_recipe_refuses_bad_options_before_any_stage(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="each K must be in 1..3"):
        recipe(RecipeArgs(target=str(llama_dir), out=str(tmp_path), num_heads=3, eval_ks=[4]))
    with pytest.raises(FileNotFoundError, match="no file at nowhere.jsonl"):
        recipe(RecipeArgs(target=str(llama_dir), out=str(tmp_path), prompts=["nowhere.jsonl"]))
    assert not (tmp_path / "stages.json").exists()


def test_tau_by_category_pools_the_requests_of_each_category():
    prompts = [Prompt("f:1", "a", True, "math"), Prompt("f:2", "b", True, "math"), Prompt("f:3", "c", True)]
    stats = DecodeStats(2, steps_by_request=[4, 6, 5], accepted_by_request=[4, 1, 0])
    assert tau_by_category(prompts, stats) == {"math": (10 + 5) / 10, "other": 1.0}


def test_training_under_torchrun_gets_the_same_arguments(tmp_path):
    args = RecipeArgs(target="T", out=str(tmp_path), head_type="eagle3", steps=7, draft_vocab_size=24, nproc=2)
    command = torchrun_command(train_args(args, tmp_path / "eagle3"), 2)
    parsed = cli.build_parser().parse_args(command[command.index("train") :])
    train = train_args(args, tmp_path / "eagle3")
    assert {name: getattr(parsed, name) for name in vars(train) if hasattr(parsed, name)} == {
        name: value for name, value in vars(train).items() if hasattr(parsed, name)
    }


@pytest.fixture(scope="module")
def recipe_runs(trained_pair, tmp_path_factory):
    """The tiny target's recipe for each kind into one folder (Medusa by two processes, no cache)."""
    target_dir = trained_pair[0]
    root = tmp_path_factory.mktemp("recipe")
    eval_file = chat_prompt_file(root / "eval.jsonl", 8, 123, categories=("shorter", "longer"))
    common = dict(
        target=str(target_dir), out=str(root / "out"), prompts=[str(chat_prompt_file(root / "p.jsonl", 256, 7))],
        max_new_tokens=48, data_engine="hf", data_dtype="float32", data_batch_size=64, num_heads=3, steps=60,
        batch_size=16, lr=3e-3, save_dtype=None, eval_prompts=[str(eval_file)],
        eval_num_prompts=8, eval_max_new_tokens=24, eval_ks=[2], progress=False,
    )  # fmt: skip
    kinds = {}
    for head_type, nproc in (("residual", 1), ("eagle3", 1), ("medusa", 2)):
        args = RecipeArgs(head_type=head_type, nproc=nproc, hidden_cache=nproc == 1, **common)
        kinds[head_type] = recipe(args)
        if head_type == "residual":
            baseline = (root / "out" / "baseline.json").stat().st_mtime_ns
    assert (root / "out" / "baseline.json").stat().st_mtime_ns == baseline  # the target decoded once
    return root / "out", kinds


@pytest.mark.parametrize("head_type", ["residual", "eagle3", "medusa"])
def test_recipe_trains_a_working_draft_of_each_kind_on_the_same_data(recipe_runs, head_type):
    out, kinds = recipe_runs
    kind = kinds[head_type]
    stages = json.loads((out / "stages.json").read_text())
    assert "prompts" not in stages and {"answers", f"{head_type}/train", f"{head_type}/evaluate"} <= set(stages)
    assert DraftModel.from_pretrained(kind / "train").config.head_type == head_type
    assert (kind / "hidden.safetensors").is_file() == (head_type != "medusa")
    (row,) = json.loads((kind / "evaluation.json").read_text())["rows"]
    assert row["outputs_identical"] and row["tau"] > 1.2, row
    assert set(row["tau_by_category"]) == {"shorter", "longer"} and min(row["tau_by_category"].values()) > 1.1
    card = (kind / "README.md").read_text()
    assert f"{row['tau']:.2f}" in card and "train/loss.png" in card and (kind / "train" / "loss.png").is_file()
