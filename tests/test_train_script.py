"""scripts/train_smollm2_gpu.sh at a tiny scale on the CPU with the real target: every stage runs,
so that a session lent a GPU spends it training, not debugging the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from chimera_vllm.demo import DRAFT, PROMPTS
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.fetch import fetch_target

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_smollm2_gpu.sh"


def test_the_gpu_script_continues_the_shipped_draft_on_target_written_prompts(tmp_path):
    fetch_target("smollm2-135m")  # a no-op after the set-up
    eval_prompts = tmp_path / "eval.jsonl"
    eval_prompts.write_text(PROMPTS.read_text().splitlines()[0] + "\n")
    knobs = dict(
        RUN=str(tmp_path / "run"),
        DEVICE="cpu",
        PYTHON=sys.executable,
        GREEDY="0",
        SAMPLED_COPIES="0",
        GSM8K_PROMPTS="2",
        MAGPIE_SAMPLES="4",
        MAGPIE_OPENERS="data/prompt_openers.txt",
        MAX_NEW_TOKENS="16",
        GEN_BATCH="4",
        STEPS="2",
        BATCH="2",
        INIT_DRAFT=resolve_draft(DRAFT),
        TRAIN_ARGS="--kl-weight 1",
        DRAFT_NAME="continued",
        EVAL_PROMPTS=str(eval_prompts),
        TREE_NODES="6",
        TREE_PROMPTS=str(eval_prompts),  # at this scale; the default is 80 target-written prompts
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
