"""The Medusa baseline: heads that read only the target's last hidden state.

No trigram or full-context encoder: head k drafts token k from the anchor h_n alone
(y = h_a + SiLU(W_k h_a + b_k), logits = LMHead(y)). Trained, decoded and evaluated by the same
code as the Chimera draft, so that the two are measured side by side on the same data and budget;
``chimera-vllm export-medusa`` writes it in vLLM's own Medusa format.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from chimera_vllm.config import ChimeraConfig
from chimera_vllm.model.base import DraftInputs, DraftModel, TargetParts, TokenChooser, shifted_anchor
from chimera_vllm.model.layers import MedusaHeads
from chimera_vllm.model.tree import DraftTree


class MedusaDraft(DraftModel):
    """A draft of ``head_type`` "medusa"."""

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        self.heads = MedusaHeads(config.num_heads, config.hidden_size)

    @torch.no_grad()
    def propose(
        self, inputs: DraftInputs, num_steps: int, choose: TokenChooser | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self.check_num_steps(num_steps)
        drafted = [self._draft_tokens(k, None, inputs.anchor, inputs.parts, choose) for k in range(num_steps)]
        tokens = torch.stack([tok for tok, _ in drafted], dim=1)
        return tokens, None if choose is None else torch.stack([logits for _, logits in drafted], dim=1)

    @torch.no_grad()
    def propose_tree(self, inputs: DraftInputs, tree: DraftTree) -> Tensor:
        """The heads read the anchor alone: every node of a depth has the same choices."""
        self.check_num_steps(tree.depth)
        B = inputs.anchor.shape[0]
        tokens = torch.empty(B, tree.num_nodes, dtype=torch.long, device=inputs.anchor.device)
        for depth in range(tree.depth):
            nodes = tree.expanding(depth)
            features, rows = self.draft_vocab_product(depth, None, inputs.anchor, inputs.parts)
            self._tree_depth_tokens(tree, depth, nodes, features[:, None].expand(B, len(nodes), -1), rows, tokens)
        return tokens

    def training_steps(
        self, parts: TargetParts, input_ids: Tensor, hidden: Tensor, num_steps: int, aux: Tensor | None = None
    ) -> Iterator[tuple[int, None, Tensor]]:
        for k in range(num_steps):
            yield k, None, shifted_anchor(hidden, k)
