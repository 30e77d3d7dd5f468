"""What every kind of draft shares: the target parts it reads, the drafting loop's inputs, the
draft vocabulary, the heads' products and the checkpoint format (config.json + model.safetensors).

Shapes use B (batch), T (query positions), S (key/value positions), H (hidden), V (vocabulary),
K (draft steps). A draft owns no copy of the target's embedding or LM head: both are passed in as
:class:`TargetParts` and never appear in its state dict. The kinds: :class:`~chimera_vllm.model.draft.ChimeraDraft`
(the method) and the baselines it is measured against, :class:`~chimera_vllm.model.medusa.MedusaDraft` and
:class:`~chimera_vllm.model.eagle3.Eagle3Draft`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError
from chimera_vllm.kernels.greedy_head import greedy_draft_head
from chimera_vllm.model.layers import restrict_to_vocab
from chimera_vllm.model.tree import DraftTree


@dataclass
class TargetParts:
    """The frozen target tensors the draft reads: input embedding [V, H] and LM head [V, H]."""

    embed_weight: Tensor
    lm_head_weight: Tensor

    @classmethod
    def from_model(cls, model: nn.Module) -> TargetParts:
        return cls(
            embed_weight=model.get_input_embeddings().weight.detach(),
            lm_head_weight=model.get_output_embeddings().weight.detach(),
        )


@dataclass
class DraftInputs:
    """What the drafting loop reads once the target has verified x_0..x_n of B requests and
    produced x_{n+1}: ctx_k/ctx_v [B, kvh, S, d] are the encoder's keys/values of the verified
    hidden states h_0..h_n (None for Medusa) in S slots, ctx_valid [B, S] marks the real ones,
    last_tokens [B, 3] are (x_{n-1}, x_n, x_{n+1}), next_position [B] is n+1, anchor [B, H] is h_n;
    aux [B, 3H] (EAGLE-3 only) is the target's hidden states of x_n from the layers the draft reads."""

    parts: TargetParts
    ctx_k: Tensor | None
    ctx_v: Tensor | None
    ctx_valid: Tensor
    last_tokens: Tensor
    next_position: Tensor
    anchor: Tensor
    aux: Tensor | None = None


TokenChooser = Callable[[int, Tensor], Tensor]
"""(step k, logits [B, V]) -> chosen token ids [B]. None means greedy, by the fused arg-max."""


WEIGHTS_NAME = "model.safetensors"


class ChimeraCheckpointError(ValueError):
    """A draft checkpoint is missing, corrupt, or does not match its config."""


def shifted_anchor(hidden: Tensor, step: int) -> Tensor:
    """anchor[:, p] = h_{p-step-1}: the anchor of draft step ``step`` at query p in a teacher-forced
    pass (zeros where p <= step, which no loss reads)."""
    return F.pad(hidden, (0, 0, step + 1, 0))[:, : hidden.shape[1]]


def draft_class(config: ChimeraConfig) -> type[DraftModel]:
    """The draft class a config describes: a baseline for head_type "medusa" or "eagle3", else Chimera."""
    from chimera_vllm.model.draft import ChimeraDraft
    from chimera_vllm.model.eagle3 import Eagle3Draft
    from chimera_vllm.model.medusa import MedusaDraft

    return {"medusa": MedusaDraft, "eagle3": Eagle3Draft}.get(config.head_type, ChimeraDraft)


class DraftModel(nn.Module):
    """A draft: heads over features of the target's state, a draft vocabulary, a checkpoint.

    Subclasses give the drafting loop (:meth:`propose`, :meth:`propose_tree`), the teacher-forced
    training pass (:meth:`training_steps`) and what they cache of the verified context
    (:meth:`context_kv`).
    """

    heads: nn.Module

    def __init__(self, config: ChimeraConfig):
        super().__init__()
        self.config = config
        # Target ids the heads may draft (sorted); None drafts from the whole vocabulary.
        vocab = None if config.draft_vocab_size is None else torch.zeros(config.draft_vocab_size, dtype=torch.long)
        self.register_buffer("draft_vocab", vocab)

    def init_heads_from_target(self, parts: TargetParts) -> None:
        """Initialise the heads from the target's LM head where the method says so (default: they
        start at zero, which already equals the target's LM head on their input)."""

    def context_kv(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """What the draft keeps of verified hidden states [B, T, H] at positions [B, T]: keys and
        values [B, kvh, T, d], or None for a draft that reads no context."""
        return None

    def propose(
        self, inputs: DraftInputs, num_steps: int, choose: TokenChooser | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The drafting loop for a batch of requests: the drafted tokens [B, num_steps] and their
        logits [B, num_steps, V] (None when choose is None: greedy drafting by the fused arg-max)."""
        raise NotImplementedError

    def propose_tree(self, inputs: DraftInputs, tree: DraftTree) -> Tensor:
        """Greedy drafting of a token tree: [B, N], node i's token being the draft's
        (path[-1])-th choice after the tokens of its ancestors."""
        raise NotImplementedError

    def training_steps(
        self, parts: TargetParts, input_ids: Tensor, hidden: Tensor, num_steps: int, aux: Tensor | None = None
    ) -> Iterator[tuple[int, Tensor | None, Tensor]]:
        """Yield (k, ĥ^(k) [B, T, H] or None, anchor^(k) [B, T, H]) for every draft step of a whole
        sequence at once, teacher-forced: what the drafting loop computes at each query position.
        Positions p <= k have no anchor; their outputs are meaningless and must not be trained.
        aux [B, T, 3H]: the target's hidden states of the layers an EAGLE-3 draft reads."""
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def weights_read_per_step(self) -> int:
        """Weights one draft step reads (elements): the draft's own, one head of the stacked ones, and
        the LM-head rows of the draft vocabulary (the target's, which the draft does not own)."""
        own = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("heads."))
        one_head = sum(p[0].numel() for p in self.heads.parameters())
        rows = 0 if self.config.head_type == "full" else (self.config.draft_vocab_size or self.config.vocab_size)
        return own + one_head + rows * self.config.hidden_size

    def head_logits(self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts) -> Tensor:
        """Every head is features [..., D] times a vocabulary matrix [V, D]."""
        features, vocab = self.heads(step, h_hat, anchor, parts.lm_head_weight)
        return F.linear(features, vocab.to(features.dtype))

    def draft_vocab_product(
        self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts
    ) -> tuple[Tensor, Tensor]:
        """(features [..., D], rows [Vd, D]): head `step` over the draft vocabulary only.

        Index i of features @ rows.T is target token draft_vocab[i] (all V tokens when
        the draft has no vocabulary). Greedy drafting and training both use it, so
        neither computes the logits of tokens the draft can never propose.
        """
        features, vocab = self.heads(step, h_hat, anchor, parts.lm_head_weight)
        if self.draft_vocab is not None:
            vocab = vocab.index_select(0, self.draft_vocab)
        return features, vocab.to(features.dtype)

    def draft_vocab_index(self, token_ids: Tensor, vocab_size: int) -> Tensor:
        """Target token ids -> their indices in :meth:`draft_vocab_product`'s rows: -1 for a token
        the draft cannot propose (the ids themselves when it has no vocabulary)."""
        if self.draft_vocab is None:
            return token_ids
        index = torch.full((vocab_size,), -1, dtype=torch.long, device=token_ids.device)
        index[self.draft_vocab] = torch.arange(len(self.draft_vocab), device=token_ids.device)
        return index[token_ids]

    def set_draft_vocab(self, token_ids: Tensor) -> None:
        """Draft only these target tokens (the rest of the vocabulary gets probability 0).

        The LM-head product of every draft step then reads len(token_ids) rows instead of V;
        decoding stays lossless, as the target verifies every drafted token.
        """
        ids = self.vocab_ids(token_ids)
        self.config.draft_vocab_size = ids.numel()
        self.draft_vocab = ids

    def vocab_ids(self, token_ids: Tensor) -> Tensor:
        """The distinct ids of token_ids, sorted, on the draft's device; refused unless they are
        target token ids."""
        ids = torch.unique(token_ids.long().flatten())
        if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= self.config.vocab_size:
            raise ChimeraConfigError(f"draft vocabulary ids must lie in 0..{self.config.vocab_size - 1}")
        return ids.to(next(self.parameters()).device)

    def _draft_tokens(
        self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts, choose: TokenChooser | None
    ) -> tuple[Tensor, Tensor | None]:
        """(tokens [B], logits [B, V]); greedy drafting never materialises the logits."""
        if choose is None:
            features, rows = self.draft_vocab_product(step, h_hat, anchor, parts)
            best = greedy_draft_head(features, rows)
            return (best if self.draft_vocab is None else self.draft_vocab[best]), None
        logits = self.head_logits(step, h_hat, anchor, parts)
        if self.draft_vocab is not None:
            logits = restrict_to_vocab(logits, self.draft_vocab)
        return choose(step, logits), logits

    def _tree_depth_tokens(
        self, tree: DraftTree, depth: int, nodes: list[int], features: Tensor, rows: Tensor, tokens: Tensor
    ) -> list[tuple[int, int, int]]:
        """Fill tokens[:, i] for the tree's nodes at this depth from the top choices of the expanding
        nodes' features [B, E, D] (E in ``nodes`` order); returns (node, parent, column) of the
        nodes that grow children at the next depth."""
        top = F.linear(features, rows).topk(tree.choices(depth), dim=-1).indices  # [B, E, choices]
        if self.draft_vocab is not None:
            top = self.draft_vocab[top]
        column = {u: j for j, u in enumerate(nodes)}
        grows = set(tree.expanding(depth + 1)) if depth + 1 < tree.depth else set()
        grown = []
        for i, (path, parent) in enumerate(zip(tree.paths, tree.parents)):
            if len(path) != depth + 1:
                continue
            tokens[:, i] = top[:, column[parent], path[-1]]
            if i in grows:
                grown.append((i, parent, column[parent]))
        return grown

    def check_num_steps(self, num_steps: int) -> None:
        self.config.check_num_steps(num_steps)

    # --- checkpoints ---------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (the draft's own weights only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        self.config.save(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        target_config=None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> DraftModel:
        """Load a draft; with ``target_config``, refuse it unless it was built for that target."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no Chimera draft directory at {directory}")
        config = ChimeraConfig.load(directory)
        if target_config is not None:
            config.check_target(target_config)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no draft weights at {path}")
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ChimeraCheckpointError(f"corrupt draft weights {path}: {e}") from e
        kind = draft_class(config)
        if not issubclass(kind, cls):
            raise ChimeraCheckpointError(
                f"{directory} holds a {config.head_type!r} draft ({kind.__name__}), not a {cls.__name__}"
            )
        model = kind(config).to(device)
        _check_shapes(_shapes(model.state_dict()), _shapes(state), path)
        _check_draft_vocab(state.get("draft_vocab"), config.vocab_size, path)
        model.load_state_dict(state)
        return model.to(dtype or getattr(torch, config.dtype)).eval()


def check_draft_file(path: str | Path, config: ChimeraConfig) -> None:
    """Refuse a draft weights file that cannot be the draft its config describes, naming the file
    and the value: unreadable (truncated, corrupt), weights missing, unexpected or of another shape,
    or draft vocabulary ids outside the target's vocabulary. Reads the file's header and the
    draft vocabulary only, so an engine can check a draft before it starts."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            vocab = f.get_tensor("draft_vocab") if "draft_vocab" in found else None
    except (SafetensorError, OSError) as e:
        raise ChimeraCheckpointError(f"corrupt draft weights {path}: {e}") from e
    with torch.device("meta"):
        expected = _shapes(draft_class(config)(config).state_dict())
    _check_shapes(expected, found, path)
    _check_draft_vocab(vocab, config.vocab_size, path)


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ChimeraCheckpointError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise ChimeraCheckpointError(f"{path}: weight {name} has shape {found[name]}, the config implies {shape}")


def _check_draft_vocab(ids: Tensor | None, vocab_size: int, path: Path) -> None:
    """A draft vocabulary holds distinct integer ids of target tokens."""
    if ids is None:
        return
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ChimeraCheckpointError(f"{path}: draft_vocab holds {ids.dtype} values, not token ids")
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise ChimeraCheckpointError(
            f"{path}: draft_vocab holds token id {outside[0].item()}, "
            f"outside the target's vocabulary 0..{vocab_size - 1}"
        )
    if ids.unique().numel() != ids.numel():
        raise ChimeraCheckpointError(f"{path}: draft_vocab lists a token id twice")
