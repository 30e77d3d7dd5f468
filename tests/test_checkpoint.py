"""Draft checkpoints: config format, save/load, mismatch and corruption errors, official import."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError, TargetSpec, check_supported_target
from chimera_vllm.model.base import ChimeraCheckpointError, TargetParts, check_draft_file
from chimera_vllm.model.checkpoint import convert_official, init_draft
from chimera_vllm.model.draft import ChimeraDraft
from chimera_vllm.reference.target import final_hidden
from chimera_vllm.testing.tiny import tiny_target_config

from .conftest import draft_after


def greedy_logits(draft, parts, ids, hidden, n, K=3):
    return draft_after(draft, parts, ids, hidden, n, K, lambda k, logits: logits.argmax(-1))[1]


def test_config_is_speculators_style_and_round_trips(llama_target, llama_dir, tmp_path):
    draft = init_draft(llama_target, str(llama_dir), num_heads=3)
    draft.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["speculators_model_type"] == "chimera"
    assert d["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert d["speculators_config"]["verifier"] == {
        "name_or_path": str(llama_dir),
        "architectures": ["LlamaForCausalLM"],
    }
    layer = d["transformer_layer_config"]
    assert (
        layer["num_hidden_layers"],
        layer["num_attention_heads"],
        layer["num_key_value_heads"],
        layer["head_dim"],
    ) == (1, 2, 1, 32)
    assert d["target"]["vocab_size"] == llama_target.config.vocab_size
    assert ChimeraConfig.load(tmp_path) == draft.config


def test_save_load_gives_identical_drafts_without_target_weights(llama_target, llama_dir, tmp_path):
    draft = init_draft(llama_target, str(llama_dir), num_heads=3, seed=1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    draft.save_pretrained(tmp_path)
    loaded = ChimeraDraft.from_pretrained(tmp_path, llama_target.config)
    parts = TargetParts.from_model(llama_target)
    ids = torch.randint(5, 100, (1, 10))
    hidden = final_hidden(llama_target, ids)
    assert torch.equal(greedy_logits(draft, parts, ids, hidden, 6), greedy_logits(loaded, parts, ids, hidden, 6))
    V, H = llama_target.config.vocab_size, llama_target.config.hidden_size
    assert not any(t.shape == (V, H) for t in loaded.state_dict().values()), "draft must not store E or the LM head"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_size": 96}, "hidden_size=64 but the target has hidden_size=96"),
        ({"vocab_size": 200}, "vocab_size=105 but the target has vocab_size=200"),
        ({"num_key_value_heads": 2}, "num_key_value_heads=1 but the target has num_key_value_heads=2"),
        ({"rope_theta": 500.0}, "rope_parameters="),
    ],
)
def test_draft_for_another_target_is_refused(llama_target, llama_dir, tmp_path, change, message):
    init_draft(llama_target, str(llama_dir), num_heads=2).save_pretrained(tmp_path)
    other = tiny_target_config("llama", **{"vocab_size": 105, **change})
    with pytest.raises(ChimeraConfigError, match="draft/target mismatch") as err:
        ChimeraDraft.from_pretrained(tmp_path, other)
    assert message in str(err.value)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(
        ChimeraConfigError, match=r"unsupported target architecture 'gpt2'.*LlamaForCausalLM.*Qwen2ForCausalLM"
    ):
        check_supported_target(GPT2Config())


def test_missing_and_corrupt_checkpoints(llama_target, llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Chimera draft directory"):
        ChimeraDraft.from_pretrained(tmp_path / "nowhere")
    init_draft(llama_target, str(llama_dir), num_heads=2).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ChimeraCheckpointError, match="corrupt draft weights"):
        ChimeraDraft.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no draft weights at"):
        ChimeraDraft.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ truncated")
    with pytest.raises(ChimeraConfigError, match="config.json is not valid JSON"):
        ChimeraDraft.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(llama_target, llama_dir, tmp_path):
    init_draft(llama_target, str(llama_dir), num_heads=2).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["chimera"]["num_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(
        ChimeraCheckpointError, match=r"heads.weight has shape \(2, 64, 128\), the config implies \(3, 64, 128\)"
    ):
        ChimeraDraft.from_pretrained(tmp_path)


def _truncate(weights) -> None:
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _scribble_on_header(weights) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" * 40 + data[48:])


def _vocab_id(value: int):
    def change(weights) -> None:
        state = load_file(weights)
        state["draft_vocab"][3] = value
        save_file(state, weights)

    return change


def _reshape_heads(weights) -> None:
    state = load_file(weights)
    state["heads.weight"] = state["heads.weight"][:, :, :-1].contiguous()
    save_file(state, weights)


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate, r"corrupt draft weights .*model.safetensors: .*incomplete metadata"),
        (_scribble_on_header, r"corrupt draft weights .*model.safetensors: .*invalid JSON"),
        (_vocab_id(105), r"model.safetensors: draft_vocab holds token id 105, outside the target's vocabulary 0..104"),
        (_vocab_id(-2), r"model.safetensors: draft_vocab holds token id -2"),
        (_vocab_id(7), r"model.safetensors: draft_vocab lists a token id twice"),
        (_reshape_heads, r"model.safetensors: weight heads.weight has shape \(2, 64, 127\), the config implies"),
    ],
)
def test_a_damaged_weights_file_is_refused_from_its_header_naming_file_and_value(
    llama_target, llama_dir, tmp_path, damage, message
):
    """What an engine checks before it starts (check_draft_file), and what loading the draft refuses."""
    draft = init_draft(llama_target, str(llama_dir), num_heads=2)
    draft.set_draft_vocab(torch.arange(5, 60))
    draft.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    check_draft_file(weights, draft.config)  # the undamaged file passes
    damage(weights)
    with pytest.raises(ChimeraCheckpointError, match=message):
        check_draft_file(weights, ChimeraConfig.load(tmp_path))
    with pytest.raises(ChimeraCheckpointError, match=message):
        ChimeraDraft.from_pretrained(tmp_path)


def test_bad_config_values_are_named(llama_target):
    spec = TargetSpec.from_target_config(llama_target.config)
    with pytest.raises(ChimeraConfigError, match="head_type must be one of .* got 'tree'"):
        ChimeraConfig(spec, head_type="tree")
    with pytest.raises(ChimeraConfigError, match="num_heads must be >= 1, got 0"):
        ChimeraConfig(spec, num_heads=0)


def test_full_heads_start_from_the_lm_head(llama_target, llama_dir):
    draft = init_draft(llama_target, str(llama_dir), num_heads=2, head_type="full")
    lm = llama_target.get_output_embeddings().weight
    assert torch.equal(draft.heads.weight[1], torch.cat([lm, lm], dim=-1))


# --- the authors' checkpoint format -----------------------------------------------------------


class OfficialResBlock(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.linear = nn.Linear(size, size)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


def official_modules(config: LlamaConfig, K: int, seed: int = 0):
    """The modules kafkayu/Chimera saves, with random weights."""
    torch.manual_seed(seed)
    H, V = config.hidden_size, config.vocab_size
    layer_cfg = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    layer_cfg._attn_implementation = "eager"
    trimlp = nn.Sequential(OfficialResBlock(3 * H), nn.Linear(3 * H, H, bias=False))
    fast_layer1 = nn.Sequential(LlamaDecoderLayer(layer_cfg, layer_idx=0))
    heads = nn.ModuleList([nn.Sequential(nn.Linear(2 * H, V, bias=False)) for _ in range(K)])
    with torch.no_grad():
        for module in (trimlp, fast_layer1, heads):
            for name, p in module.named_parameters():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "layernorm" in name else 0.0))
    return trimlp, fast_layer1, heads, LlamaRotaryEmbedding(layer_cfg)


def official_draft_logits(mods, embed, ids, hidden, n, K):
    """Re-implementation of the official forward: the decoder layer over [h_0..h_n, ĥ.., e_p]."""
    trimlp, fast_layer1, heads, rotary = mods
    tokens = ids[0].tolist()[: n + 2]
    seq = hidden[0, : n + 1]
    logits = []
    for k in range(K):
        p = n + 1 + k
        tri = [tokens[max(p - 2, 0)], tokens[max(p - 1, 0)], tokens[p]]
        e = trimlp(embed[tri].flatten())
        x = torch.cat([seq, e[None]])[None]
        pos = torch.arange(p + 1)[None]
        out = fast_layer1[0](x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
        h_hat = out[0, -1]  # the last position attends to everything before it: no mask needed
        step_logits = heads[k](torch.cat([hidden[0, n], h_hat]))
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        seq = torch.cat([seq, h_hat[None]])
    return torch.stack(logits)


def test_convert_official_matches_the_official_forward(llama_target, llama_dir, tmp_path):
    K = 3
    mods = official_modules(llama_target.config, K)
    torch.save(mods[0].state_dict(), tmp_path / "trimlp.pt")
    torch.save(mods[1].state_dict(), tmp_path / "fast_layer1.pt")
    torch.save(mods[2].state_dict(), tmp_path / "chimera_head.pt")
    draft = convert_official(llama_target, str(llama_dir), tmp_path)
    assert (draft.config.head_type, draft.config.trigram_mlp, draft.num_heads) == ("full", "resblock", K)
    parts = TargetParts.from_model(llama_target)
    ids = torch.randint(5, 100, (1, 14), generator=torch.Generator().manual_seed(3))
    hidden = final_hidden(llama_target, ids)
    with torch.no_grad():
        for n in [0, 1, 4, 9]:
            ours = greedy_logits(draft, parts, ids, hidden, n, K)
            theirs = official_draft_logits(mods, parts.embed_weight, ids, hidden, n, K)
            torch.testing.assert_close(ours[0], theirs, rtol=1e-4, atol=1e-4)


def test_convert_official_refuses_wrong_shapes_and_missing_files(llama_target, llama_dir, tmp_path):
    other = tiny_target_config("llama", vocab_size=105, hidden_size=96)
    mods = official_modules(other, 2)
    torch.save(mods[0].state_dict(), tmp_path / "trimlp.pt")
    torch.save(mods[1].state_dict(), tmp_path / "fast_layer1.pt")
    with pytest.raises(FileNotFoundError, match="chimera_head.pt"):
        convert_official(llama_target, str(llama_dir), tmp_path)
    torch.save(mods[2].state_dict(), tmp_path / "chimera_head.pt")
    with pytest.raises(
        ChimeraCheckpointError,
        match=r"trigram.mlp.0.linear.weight has shape \(288, 288\), "
        r"but target .* \(hidden 64, vocab 105\) needs \(192, 192\)",
    ):
        convert_official(llama_target, str(llama_dir), tmp_path)
    (tmp_path / "trimlp.pt").write_bytes(b"not a pickle")
    with pytest.raises(ChimeraCheckpointError, match="cannot read .*trimlp.pt"):
        convert_official(llama_target, str(llama_dir), tmp_path)
