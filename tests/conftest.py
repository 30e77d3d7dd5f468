"""Shared fixtures: tiny targets built offline, and a briefly trained target + draft pair."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Kernel tests run Triton's interpreter on CPU; it must be chosen before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from chimera_vllm.model.base import DraftInputs  # noqa: E402
from chimera_vllm.model.checkpoint import init_draft  # noqa: E402
from chimera_vllm.model.draft import ChimeraDraft  # noqa: E402
from chimera_vllm.reference.target import load_target, load_tokenizer  # noqa: E402
from chimera_vllm.testing.tiny import build_tiny_target, build_trained_pair  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A benchmarks/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_target_dir(request, tmp_path_factory):
    """A random tiny target of each supported family (hidden 64, head_dim 32, GQA)."""
    return build_tiny_target(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def llama_target(llama_dir):
    return load_target(str(llama_dir))


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """A tiny target taught the synthetic grammar, and a Chimera draft distilled from it.

    Returns (target_dir, target, tokenizer, untrained draft, trained draft).
    """
    target_dir, draft_dir = build_trained_pair(tmp_path_factory.mktemp("trained"))
    target, tokenizer = load_target(str(target_dir)), load_tokenizer(str(target_dir))
    untrained = init_draft(target, str(target_dir), num_heads=4)
    trained = ChimeraDraft.from_pretrained(draft_dir, target.config)
    return target_dir, target, tokenizer, untrained, trained


def hf_greedy(target, prompts: list[list[int]], max_new_tokens: int, eos: int) -> list[list[int]]:
    """The target's own greedy decoding, one prompt at a time, by transformers' generate(), stopping at eos."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
        outs.append(out[0, len(p) :].tolist())
    return outs


def draft_after(draft, parts, ids, hidden, n: int, num_steps: int, choose):
    """The drafting loop as it starts once the target verified x_0..x_n of ids [1, T] and produced
    x_{n+1}: context h_0..h_n from hidden [1, T, H], anchor h_n. Returns (tokens, logits)."""
    context = draft.context_kv(hidden[:, : n + 1], torch.arange(n + 1)[None])
    ctx_k, ctx_v = (None, None) if context is None else context
    t = ids[0].tolist()
    last3 = torch.tensor([[t[max(n - 1, 0)], t[n], t[n + 1]]])
    valid = torch.ones(1, n + 1, dtype=torch.bool)
    inputs = DraftInputs(parts, ctx_k, ctx_v, valid, last3, torch.tensor([n + 1]), hidden[:, n])
    return draft.propose(inputs, num_steps, choose)
