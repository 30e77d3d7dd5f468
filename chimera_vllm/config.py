"""The Chimera draft's configuration and its speculators-style config.json.

A draft directory holds ``config.json`` in the convention vLLM already reads for
speculator checkpoints (``speculators_model_type``, ``speculators_config`` with
``proposal_methods`` and ``verifier``, ``transformer_layer_config``), plus a
``target`` block with the shapes of the target the draft was built for and a
``chimera`` block with the method's hyper-parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PretrainedConfig

CONFIG_NAME = "config.json"
SPECULATORS_MODEL_TYPE = "chimera"
DRAFT_ARCHITECTURE = "ChimeraDraftModel"

# model_type -> architecture name of the target families Chimera supports.
SUPPORTED_TARGETS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TRIGRAM_MLPS = ("resblock", "linear")
HEAD_TYPES = (
    "residual",
    "full",
    "medusa",
    "eagle3",
)  # medusa, eagle3: the baselines (model/medusa.py, model/eagle3.py)


class ChimeraConfigError(ValueError):
    """A draft config is malformed, or does not fit the target it is attached to."""


def check_supported_target(target_config: PretrainedConfig) -> None:
    """Refuse targets whose architecture Chimera does not support."""
    model_type = getattr(target_config, "model_type", None)
    if model_type not in SUPPORTED_TARGETS:
        supported = ", ".join(f"{a} ({t})" for t, a in SUPPORTED_TARGETS.items())
        raise ChimeraConfigError(
            f"unsupported target architecture {model_type!r} "
            f"({getattr(target_config, 'architectures', None)}); Chimera supports: {supported}"
        )


@dataclass(frozen=True)
class TargetSpec:
    """The target shapes a draft depends on; a draft only fits a target with equal values."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    rms_norm_eps: float

    @classmethod
    def from_target_config(cls, config: PretrainedConfig) -> TargetSpec:
        check_supported_target(config)
        heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rope_parameters=dict(config.rope_parameters),
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
        )


# Fields whose mismatch makes a draft unusable with a target (max_position_embeddings
# and rms_norm_eps are copied for convenience but do not change what the draft computes).
_MATCHED_FIELDS = (
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_parameters",
)


@dataclass
class ChimeraConfig:
    """Everything needed to build a Chimera draft for one target."""

    target: TargetSpec
    num_heads: int = 4
    trigram_mlp: str = "resblock"
    head_type: str = "residual"
    intermediate_size: int | None = None  # encoder layer's MLP width; default: 4H rounded
    draft_vocab_size: int | None = None  # drafting restricted to this many target tokens (None: all)
    # eagle3 only: the target layers whose hidden states the draft fuses (vLLM's aux hidden states:
    # the residual stream entering layer i; i = the target's layer count is the last layer's output).
    aux_layers: list[int] | None = None
    verifier_name_or_path: str = ""
    verifier_architectures: list[str] = field(default_factory=list)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ChimeraConfigError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.trigram_mlp not in TRIGRAM_MLPS:
            raise ChimeraConfigError(f"trigram_mlp must be one of {TRIGRAM_MLPS}, got {self.trigram_mlp!r}")
        if self.head_type not in HEAD_TYPES:
            raise ChimeraConfigError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.target.hidden_size
        if self.intermediate_size < 1:
            raise ChimeraConfigError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if (self.head_type == "eagle3") != (self.aux_layers is not None):
            raise ChimeraConfigError(
                f"aux_layers={self.aux_layers!r}: an eagle3 draft names the target layers it reads, no other kind does"
            )
        if self.aux_layers is not None and (len(set(self.aux_layers)) != 3 or min(self.aux_layers) < 0):
            raise ChimeraConfigError(
                f"aux_layers must be three distinct target layer ids >= 0, got {self.aux_layers!r}"
            )
        if self.aux_layers is not None:
            self.aux_layers = sorted(self.aux_layers)  # vLLM concatenates them in this order
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.target.vocab_size:
            raise ChimeraConfigError(
                f"draft_vocab_size must be in 1..{self.target.vocab_size} (the target's vocabulary), "
                f"got {self.draft_vocab_size}"
            )

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def layer_config(self) -> LlamaConfig:
        """The transformers config of the full-context encoder's single decoder layer."""
        t = self.target
        return LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            hidden_act="silu",
            max_position_embeddings=t.max_position_embeddings,
            rms_norm_eps=t.rms_norm_eps,
            rope_parameters=dict(t.rope_parameters),
            attention_bias=False,
            mlp_bias=False,
        )

    def check_num_steps(self, num_steps: int) -> None:
        """Refuse more draft tokens per step than there are trained heads (or fewer than one)."""
        if not 1 <= num_steps <= self.num_heads:
            raise ChimeraConfigError(
                f"num_speculative_tokens={num_steps} is not supported by this draft: "
                f"it has {self.num_heads} heads (use 1..{self.num_heads})"
            )

    def check_target(self, target_config: PretrainedConfig) -> None:
        """Raise if this draft was built for a target with other shapes than ``target_config``."""
        other = TargetSpec.from_target_config(target_config)
        for name in _MATCHED_FIELDS:
            mine, theirs = getattr(self.target, name), getattr(other, name)
            if mine != theirs:
                raise ChimeraConfigError(
                    f"draft/target mismatch: the draft was built for {name}={mine!r} "
                    f"but the target has {name}={theirs!r}"
                )

    # --- serialisation -------------------------------------------------------

    def speculators_header(self, algorithm: str, architecture: str) -> dict[str, Any]:
        """The fields every speculators config.json opens with, for a draft of this shape and target
        (``algorithm``: "chimera", or "eagle3" for the EAGLE-3 baseline's export)."""
        layer = self.layer_config().to_diff_dict()
        layer.pop("transformers_version", None)
        layer["architectures"] = ["LlamaForCausalLM"]
        return {
            "architectures": [architecture],
            "speculators_model_type": algorithm,
            "speculators_config": {
                "algorithm": algorithm,
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": self.num_heads}],
                "default_proposal_method": "greedy",
                "verifier": {
                    "name_or_path": self.verifier_name_or_path,
                    "architectures": list(self.verifier_architectures),
                },
            },
            "transformer_layer_config": layer,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.speculators_header(SPECULATORS_MODEL_TYPE, DRAFT_ARCHITECTURE),
            "target_hidden_size": self.target.hidden_size,
            "target": asdict(self.target),
            "chimera": {
                "num_heads": self.num_heads,
                "trigram_mlp": self.trigram_mlp,
                "head_type": self.head_type,
                "intermediate_size": self.intermediate_size,
                "draft_vocab_size": self.draft_vocab_size,
                "aux_layers": self.aux_layers,
            },
            "torch_dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChimeraConfig:
        if d.get("speculators_model_type") != SPECULATORS_MODEL_TYPE:
            raise ChimeraConfigError(
                f"not a Chimera draft config: speculators_model_type="
                f"{d.get('speculators_model_type')!r}, expected {SPECULATORS_MODEL_TYPE!r}"
            )
        try:
            verifier = d["speculators_config"]["verifier"]
            chimera = d["chimera"]
            return cls(
                target=TargetSpec(**d["target"]),
                num_heads=int(chimera["num_heads"]),
                trigram_mlp=chimera["trigram_mlp"],
                head_type=chimera["head_type"],
                intermediate_size=int(chimera["intermediate_size"]),
                draft_vocab_size=chimera.get("draft_vocab_size"),
                aux_layers=chimera.get("aux_layers"),
                verifier_name_or_path=verifier.get("name_or_path", ""),
                verifier_architectures=list(verifier.get("architectures", [])),
                dtype=d.get("torch_dtype", "float32"),
            )
        except (KeyError, TypeError) as e:
            raise ChimeraConfigError(f"malformed Chimera draft config: missing or bad field {e}") from e

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ChimeraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no Chimera draft config at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ChimeraConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)
