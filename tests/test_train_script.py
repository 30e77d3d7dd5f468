"""scripts/train_smollm2_gpu.sh at a tiny scale on the CPU with the real target: every stage runs,
so that a session lent a GPU spends it training, not debugging the script."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from chimera_vllm.bench.demo import DRAFT, PROMPTS
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.reference.fetch import fetch_target

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_smollm2_gpu.sh"


def tiny_knobs(tmp_path: Path) -> dict[str, str]:
    """The GPU script's knobs for a run of a few steps on the CPU, continuing the shipped draft and
    evaluated on one MT-bench prompt; each test adds its data knobs."""
    eval_prompts = tmp_path / "eval.jsonl"
    eval_prompts.write_text(PROMPTS.read_text().splitlines()[0] + "\n")
    return dict(
        RUN=str(tmp_path / "run"),
        DEVICE="cpu",
        PYTHON=sys.executable,
        GREEDY="0",
        SAMPLED_COPIES="0",
        MAX_NEW_TOKENS="16",
        BATCH="2",
        INIT_DRAFT=resolve_draft(DRAFT),
        EVAL_PROMPTS=str(eval_prompts),
    )


def test_the_gpu_script_continues_the_shipped_draft_on_target_written_prompts(tmp_path):
    fetch_target("smollm2-135m")  # a no-op after the set-up
    knobs = tiny_knobs(tmp_path)
    knobs.update(
        GSM8K_PROMPTS="2",
        MAGPIE_SAMPLES="4",
        MAGPIE_OPENERS="chimera_vllm/data/prompt_openers.txt",
        GEN_BATCH="4",
        STEPS="2",
        TRAIN_ARGS="--kl-weight 1",
        DRAFT_NAME="continued",
        TREE_NODES="6",
        TREE_PROMPTS=knobs["EVAL_PROMPTS"],  # at this scale; the default is 80 target-written prompts
    )
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, **knobs}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    draft = tmp_path / "run" / "continued"
    shipped = load_file(Path(resolve_draft(DRAFT)) / "model.safetensors")["draft_vocab"]
    assert load_file(draft / "model.safetensors")["draft_vocab"].equal(shipped)  # kept, not rebuilt from 8 answers
    assert "draft vocabulary (--init-draft's): 8192 tokens cover" in run.stdout
    result = json.loads((draft / "eval.json").read_text())
    # two warm-up steps leave the shipped draft as it was (τ 1.41 on this prompt, 2026-11-30)
    assert result["outputs_identical"] and result["mean_accepted_length"] >= 1.3, result
    assert len(json.loads((draft / "tree.json").read_text())) == 6  # the tree's rank paths
    tree = json.loads((draft / "eval_tree.json").read_text())
    assert tree["outputs_identical"] and tree["mean_accepted_length"] > 1.0, tree


PACK = SCRIPT.with_name("device_pack.sh")
DEVICE_TRAIN = SCRIPT.with_name("device_train.sh")


def test_the_device_scripts_carry_the_target_in_pieces_and_bring_the_draft_back_in_pieces(tmp_path):
    """device_pack.sh splits the GGUF into equal pieces; device_train.sh converts the target from them into
    an empty hub cache, trains, evaluates and returns the draft as a tar in pieces of at most 15 MiB."""
    fetch_target("smollm2-135m")
    device = tmp_path / "device"
    (device / "answers").mkdir(parents=True)  # answers made beforehand (on the CPU), as run 10's
    records = [{"input_ids": list(range(100 + i, 140 + i)), "prompt_length": 20, "source": f"b{i}"} for i in range(3)]
    made = {"a.jsonl": records[:2], "b.jsonl": records[2:]}
    for name, rows in made.items():
        (device / "answers" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "DEVICE_DIR": str(device)}
    pack_env = {**env, "PYTHON": sys.executable, "PIECE_MIB": "40", "DOWNLOAD_WHEELS": "0"}
    pack = subprocess.run(["bash", str(PACK)], env=pack_env, capture_output=True, text=True)
    assert pack.returncode == 0, pack.stderr[-2000:]
    for name in made:  # gzipped into what travels
        packed = gzip.decompress((device / "data" / f"{name}.gz").read_bytes())
        assert packed == (device / "answers" / name).read_bytes()
    assert f"carry {device}/data (1 MiB) in one call of its own" in pack.stdout
    base_data = f"{device}/data/a.jsonl.gz {device}/data/b.jsonl.gz"
    assert f'BASE_DATA="{base_data}" in the training call' in pack.stdout
    pieces = sorted(device.glob("target*/piece"))
    assert [p.parent.name for p in pieces] == ["target1", "target2", "target3"]  # 94 MiB in pieces of <= 40
    assert all(p.stat().st_size <= 40 << 20 for p in pieces)

    out, hub = tmp_path / "out", tmp_path / "hub"
    out.mkdir()
    knobs = tiny_knobs(tmp_path)
    knobs.update(
        OUT=str(out),
        HF_HUB_CACHE=str(hub),  # empty: the target must come from the pieces
        GSM8K_PROMPTS="0",
        PROMPT_FILES="chimera_vllm/data/smollm2_written_prompts_steered.jsonl",
        PROMPT_LIMIT="2",
        GEN_BATCH="2",
        STEPS="1",
        TRAIN_ARGS="--save-dtype bfloat16",  # as shipped
        DRAFT_NAME="run",
        TREE_NODES="0",
        BASE_DATA=base_data,
    )
    run = subprocess.run(["bash", str(DEVICE_TRAIN)], env={**env, **knobs}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert f"is ready offline at {hub}" in log
    assert "5 training sequences" in log  # the 3 carried in two files beside the 2 answered there
    parts = sorted(out.glob("draft.tar.part*"))
    assert parts and all(p.stat().st_size <= 15 << 20 for p in parts)
    back = tmp_path / "back"
    back.mkdir()
    joined = b"".join(p.read_bytes() for p in parts)
    subprocess.run(["tar", "-xf", "-", "-C", str(back)], input=joined, check=True)
    files = {p.relative_to(back / "run").as_posix() for p in (back / "run").rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "eval.json"} <= files
    assert not [f for f in files if f.startswith("checkpoint/") or "optimizer" in f], files
    assert json.loads((back / "run" / "eval.json").read_text())["outputs_identical"]
    weights = load_file(back / "run" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}


def test_device_pack_refuses_data_that_cannot_travel_in_one_call_and_keeps_the_pieces(tmp_path):
    device = tmp_path / "device"
    (device / "target1").mkdir(parents=True)
    (device / "target1" / "piece").write_bytes(b"an earlier piece")
    (device / "data").mkdir()
    with open(device / "data" / "answers.jsonl", "wb") as f:
        f.truncate(70 << 20)  # sparse: 70 MiB by its size, nothing on disk
    env = {**os.environ, "DEVICE_DIR": str(device), "PYTHON": sys.executable, "DOWNLOAD_WHEELS": "0"}
    pack = subprocess.run(["bash", str(PACK)], env=env, capture_output=True, text=True)
    assert pack.returncode != 0
    assert f"{device}/data (70 MiB) does not fit beside the working tree" in pack.stderr
    assert (device / "target1" / "piece").read_bytes() == b"an earlier piece"


def test_the_gpu_script_names_a_missing_base_data_file_before_it_starts(tmp_path):
    present = tmp_path / "present.jsonl"
    present.write_text("")
    missing = tmp_path / "answers_seed10.jsonl.gz"
    env = {**os.environ, "RUN": str(tmp_path / "run"), "BASE_DATA": f"{present} {missing}"}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert f"BASE_DATA: no file {missing}" in run.stderr
    assert "fetch-target" not in run.stdout  # refused before the first stage


def test_the_gpu_script_refuses_to_train_on_no_data(tmp_path):
    fetch_target("smollm2-135m")
    knobs = dict(RUN=str(tmp_path / "run"), PYTHON=sys.executable, GREEDY="0", SAMPLED_COPIES="0", GSM8K_PROMPTS="0")
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, **knobs}, capture_output=True, text=True)
    assert run.returncode != 0
    assert "no training data: every data knob is off" in run.stderr
    assert not (tmp_path / "run" / "data.jsonl").exists()
