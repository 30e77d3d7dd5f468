"""Making draft checkpoints: a fresh draft for a target, one imported from the authors' release,
and the baselines exported to vLLM's own formats (Medusa, speculators eagle3).

Saving and loading a draft directory is :meth:`DraftModel.save_pretrained` /
:meth:`DraftModel.from_pretrained` (model/base.py); the config format is in config.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError, TargetSpec
from chimera_vllm.model.base import ChimeraCheckpointError, DraftModel, TargetParts, draft_class
from chimera_vllm.model.draft import ChimeraDraft
from chimera_vllm.model.eagle3 import Eagle3Draft, default_aux_layers
from chimera_vllm.model.medusa import MedusaDraft

OFFICIAL_FILES = ("trimlp.pt", "fast_layer1.pt", "chimera_head.pt")


# init_draft's keywords that shape a draft: a trained draft keeps them (see check_draft_shape).
DRAFT_SHAPE_OPTIONS = ("num_heads", "trigram_mlp", "head_type", "intermediate_size")


def draft_shape_options(args: object) -> dict:
    """The draft-shaping options `args` gives (those not None), as init_draft's keywords."""
    return {name: getattr(args, name) for name in DRAFT_SHAPE_OPTIONS if getattr(args, name, None) is not None}


def check_draft_shape(directory: str | Path, options: dict) -> None:
    """Refuse options that contradict the draft at `directory` rather than ignore them: continuing
    a trained draft keeps its shape. Reads only its config.json (nothing else is loaded yet)."""
    config = ChimeraConfig.load(directory)
    for name, value in options.items():
        if value != getattr(config, name):
            raise ChimeraConfigError(
                f"{name} {value!r} shapes a fresh draft: the draft at {directory} has {name} "
                f"{getattr(config, name)!r} and keeps it (leave the option out, or start from scratch)"
            )


def init_draft(
    target: PreTrainedModel,
    target_name_or_path: str,
    num_heads: int = 4,
    seed: int = 0,
    trigram_mlp: str = "resblock",
    head_type: str = "residual",
    intermediate_size: int | None = None,
) -> DraftModel:
    """An untrained draft for `target`, its heads initialised from the target's LM head; the
    full-context encoder's MLP is `intermediate_size` wide (default: 4x the target's hidden size).
    An EAGLE-3 draft reads the layers vLLM picks by default (:func:`default_aux_layers`)."""
    config = ChimeraConfig(
        TargetSpec.from_target_config(target.config),
        num_heads=num_heads,
        trigram_mlp=trigram_mlp,
        head_type=head_type,
        intermediate_size=intermediate_size,
        aux_layers=default_aux_layers(target.config.num_hidden_layers) if head_type == "eagle3" else None,
        verifier_name_or_path=target_name_or_path,
        verifier_architectures=list(target.config.architectures or []),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = draft_class(config)(config)
    draft.init_heads_from_target(TargetParts.from_model(target))
    return draft.to(device=target.device, dtype=target.dtype).eval()


def _load_official_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"official Chimera checkpoint file missing: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or non-tensor pickles
        raise ChimeraCheckpointError(f"cannot read {path} as a tensor state dict: {e}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ChimeraCheckpointError(f"{path} is not a state dict of tensors")
    return state


def convert_official(target: PreTrainedModel, target_name_or_path: str, official_dir: str | Path) -> DraftModel:
    """Import kafkayu/Chimera's trimlp.pt, fast_layer1.pt and chimera_head.pt.

    Their modules: trimlp = Sequential(ResBlock(3H), Linear(3H->H, no bias));
    fast_layer1 = Sequential(LlamaDecoderLayer); chimera_head[k] = Sequential(Linear(2H->V, no bias))
    over concat(h_a, ĥ). They map onto a draft with trigram_mlp="resblock", head_type="full".
    """
    official_dir = Path(official_dir)
    trimlp, layer, heads = (_load_official_file(official_dir / name) for name in OFFICIAL_FILES)

    state = {f"trigram.mlp.{k}": v for k, v in trimlp.items()}
    state.update(
        {f"encoder.{k.split('.', 1)[1]}": v for k, v in layer.items() if not k.endswith("rotary_emb.inv_freq")}
    )
    head_keys = sorted((k for k in heads), key=lambda k: int(k.split(".")[0]))
    if not head_keys or any(not k.endswith(".0.weight") for k in head_keys):
        raise ChimeraCheckpointError(
            f"{official_dir / 'chimera_head.pt'}: expected keys '<k>.0.weight', got {head_keys}"
        )
    state["heads.weight"] = torch.stack([heads[k] for k in head_keys])

    gate = state.get("encoder.mlp.gate_proj.weight")
    if gate is None:
        raise ChimeraCheckpointError(f"{official_dir / 'fast_layer1.pt'}: no 0.mlp.gate_proj.weight")
    config = ChimeraConfig(
        TargetSpec.from_target_config(target.config),
        num_heads=len(head_keys),
        trigram_mlp="resblock",
        head_type="full",
        intermediate_size=gate.shape[0],
        verifier_name_or_path=target_name_or_path,
        verifier_architectures=list(target.config.architectures or []),
    )
    draft = ChimeraDraft(config)
    expected = draft.state_dict()
    for name, value in state.items():
        if name not in expected:
            raise ChimeraCheckpointError(f"{official_dir}: unexpected official weight for {name}")
        if value.shape != expected[name].shape:
            raise ChimeraCheckpointError(
                f"{official_dir}: {name} has shape {tuple(value.shape)}, but target "
                f"{target_name_or_path} (hidden {config.hidden_size}, vocab {config.vocab_size}) "
                f"needs {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ChimeraCheckpointError(f"{official_dir}: official checkpoint lacks {missing}")
    draft.load_state_dict(state)
    return draft.to(device=target.device, dtype=target.dtype).eval()


def export_vllm_medusa(draft: MedusaDraft, parts: TargetParts, out: str | Path) -> None:
    """Write a Medusa-baseline draft in vLLM's own Medusa format (``method: medusa``).

    vLLM's Medusa head i is y = h + SiLU(W_i h + b_i) with logits LMHead(y): exactly the
    baseline's heads; the target's LM head is stored once (``original_lm_head``). A draft
    vocabulary is not exported: vLLM 0.32's Medusa loader rejects its ``token_map`` ("weights
    were not initialized from checkpoint: {'token_map'}"), so vLLM drafts from every token.
    """
    if draft.config.head_type != "medusa":
        raise ChimeraConfigError(
            f"only a Medusa-baseline draft exports to vLLM's Medusa, got {draft.config.head_type!r}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = parts.lm_head_weight.dtype
    state = {"lm_heads.0.weight": parts.lm_head_weight}
    for i in range(draft.num_heads):
        state[f"blocks.{i}.layers.0.weight"] = draft.heads.weight[i]
        state[f"blocks.{i}.layers.0.bias"] = draft.heads.bias[i]
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": draft.config.hidden_size,
        "vocab_size": draft.config.vocab_size,
        "num_heads": draft.num_heads,
        "num_hidden_layers": 1,
        "medusa_fc_bias": True,
        "original_lm_head": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_vllm_eagle3(draft: Eagle3Draft, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write an EAGLE-3 draft in the speculators ``eagle3`` format, which vLLM's own EAGLE-3 proposer
    serves (``--speculative-config '{"method": "eagle3", "model": OUT}'``, or ``vllm serve OUT``).

    The weights keep vLLM's names (the decoder layer as ``layers.0``); the draft vocabulary becomes
    ``d2t`` (target id = draft id + d2t[draft id]); the embedding is the target's, shared by vLLM.
    """
    if draft.config.head_type != "eagle3":
        raise ChimeraConfigError(f"only an EAGLE-3 draft exports to vLLM's eagle3, got {draft.config.head_type!r}")
    config = draft.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(draft.parameters()).dtype
    state = {
        name.replace("layer.", "layers.0.", 1) if name.startswith("layer.") else name: tensor.to(dtype)
        for name, tensor in draft.state_dict().items()
        if name != "draft_vocab"
    }
    if draft.draft_vocab is not None:
        state["d2t"] = draft.draft_vocab - torch.arange(len(draft.draft_vocab), device=draft.draft_vocab.device)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    speculator = {
        **config.speculators_header("eagle3", "Eagle3Speculator"),
        "draft_vocab_size": config.draft_vocab_size or config.vocab_size,
        "target_hidden_size": config.hidden_size,
        "norm_before_residual": True,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layers),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(speculator, indent=2) + "\n")
