"""Chimera's drafting loop inside vLLM's V1 model runner.

vLLM's EAGLE proposer already gives a draft model a paged KV cache of its own, the
target's hidden states and the attention metadata of each step. Chimera differs
from EAGLE in what it caches and in where its first query sits:

* the cache at a verified position j holds the encoder's key/value of the target's
  h_j (EAGLE's holds its own layer's output), so every step starts by writing the
  target's new hidden states into the cache;
* the first draft query is the trigram encoding of (x_{n-1}, x_n, x_{n+1}) at
  position n + 1, one position after the last verified one, and every step's
  residual head also reads the anchor h_n.

The trigram needs the two tokens before the newest one, which may belong to an
earlier step or chunk: a token side-cache indexed like the KV cache (one token per
KV slot, written with the target's tokens at their slots) provides them across
steps, chunked prefill, prefix caching and preemption, because it lives and dies
with the KV blocks themselves. It also gives prompt lookup (:mod:`chimera_vllm.vllm.prompt_lookup`)
each request's text, where that is switched on.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from chimera_vllm.config import ChimeraConfigError
from chimera_vllm.vllm.model import carries_chimera_config
from chimera_vllm.vllm.patches import install_on_chimera_runner
from chimera_vllm.vllm.prompt_lookup import PromptLookup, draft_model_tokens


def is_chimera_vllm_config(vllm_config: VllmConfig) -> bool:
    spec = vllm_config.speculative_config
    return (
        spec is not None
        and spec.draft_model_config is not None
        and carries_chimera_config(spec.draft_model_config.hf_config)
    )


def slots_of(positions: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slots of positions [B, N] of each request (or one position per request, [B] -> [B])."""
    per_request = positions.long() if positions.dim() == 2 else positions.long()[:, None]
    block = block_table.gather(1, per_request // block_size)
    slots = block.long() * block_size + per_request % block_size
    return slots if positions.dim() == 2 else slots[:, 0]


class ChimeraProposer(EagleProposer):
    """vLLM's EAGLE proposer, running Chimera's drafting loop when the draft is a Chimera draft.

    The plugin installs this class where vLLM's model runner looks up ``EagleProposer``;
    for every other EAGLE-style draft it behaves exactly as its parent.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None):
        super().__init__(vllm_config, device, runner)
        self.is_chimera = is_chimera_vllm_config(vllm_config)
        self.runner = runner
        self.slot_tokens: torch.Tensor | None = None
        self.lookup: PromptLookup | None = None
        if self.is_chimera:
            self.lookup = PromptLookup.of(vllm_config.speculative_config.draft_model_config.hf_config)
        if self.lookup is not None and vllm_config.scheduler_config.async_scheduling:
            raise ChimeraConfigError(
                "prompt lookup beside a Chimera draft drafts a different number of tokens per request, "
                "which vLLM's async scheduling does not take: pass --no-async-scheduling "
                "(async_scheduling=False), or leave prompt_lookup_min/max out"
            )

    def load_model(self, target_model) -> None:
        """vLLM's, then the changes to vLLM that act on this engine alone (vllm/patches)."""
        super().load_model(target_model)
        if self.is_chimera and self.runner is not None:
            install_on_chimera_runner(self.runner)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        if self.is_chimera:
            # One token per KV slot; the extra last entry absorbs writes to the padding slot (-1).
            num_slots = kv_cache_config.num_blocks * self.draft_attn_groups[0].kv_cache_spec.block_size
            self.slot_tokens = torch.zeros(num_slots + 1, dtype=torch.int32, device=self.device)

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.is_chimera:
            return self.model.greedy_tokens(hidden_states)
        return super()._greedy_sample(hidden_states)

    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: CommonAttentionMetadata,
        sampling_metadata: SamplingMetadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings=None,
    ) -> torch.Tensor:
        if not self.is_chimera:
            return super().propose(
                num_speculative_tokens,
                target_token_ids,
                target_positions,
                target_hidden_states,
                next_token_ids,
                token_indices_to_sample,
                common_attn_metadata,
                sampling_metadata,
                mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                slot_mappings=slot_mappings,
            )
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        cad = common_attn_metadata
        batch_size = cad.batch_size()
        if token_indices_to_sample is None:
            token_indices_to_sample = cad.query_start_loc[1:] - 1

        self._write_context(target_token_ids, target_positions, target_hidden_states, cad)
        if num_speculative_tokens == 0:  # a batch-size schedule's K = 0: the context is all this step needs
            return torch.empty(batch_size, 0, dtype=torch.int64, device=target_hidden_states.device)
        last = target_positions[token_indices_to_sample]  # n: the newest verified position
        trigram = torch.stack(
            [self._token_at((last - 1).clamp(min=0), cad), self._token_at(last, cad), next_token_ids.long()], dim=1
        )
        anchor = target_hidden_states[token_indices_to_sample]
        draft_inputs = (trigram, anchor, last, cad, num_rejected_tokens_gpu, sampling_metadata)
        if self.lookup is None:
            return self._draft(num_speculative_tokens, *draft_inputs)
        found = self._lookup(last, next_token_ids, cad, num_speculative_tokens)
        if all(found):  # the draft model's turn is skipped
            return found
        drafted = self._draft(draft_model_tokens(self.lookup, num_speculative_tokens), *draft_inputs)
        self._mark_lookup_drafts(found)
        return [f or row for f, row in zip(found, drafted.tolist())]

    def _draft(
        self,
        num_steps: int,
        trigram: torch.Tensor,
        anchor: torch.Tensor,
        last: torch.Tensor,
        cad: CommonAttentionMetadata,
        num_rejected_tokens_gpu: torch.Tensor | None,
        sampling_metadata: SamplingMetadata,
    ) -> torch.Tensor:
        """The draft model's num_steps tokens for every request: [B, num_steps]."""
        batch_size = cad.batch_size()
        # From here on every request has one query token per step, like EAGLE's later steps.
        cad.num_actual_tokens = batch_size
        cad.max_query_len = 1
        cad.query_start_loc = self.arange[: batch_size + 1]
        cad.query_start_loc_cpu = torch.from_numpy(self.token_arange_np[: batch_size + 1]).clone()
        if num_rejected_tokens_gpu is not None:  # padded batch: drop the rejected tokens
            cad.seq_lens -= num_rejected_tokens_gpu
        cudagraph_mode, input_batch_size, batch_size_across_dp = self._determine_batch_execution_and_padding(batch_size)
        positions = last
        tokens, probs = [], []
        for step in range(num_steps):
            positions = self._update_positions_dependent_metadata(
                positions, cad, batch_size, input_batch_size, self.block_size
            )
            _, attn_metadata = self.build_per_group_and_layer_attn_metadata(cad, draft_index=step + 1)
            self.input_ids[:batch_size] = trigram[:, 2]
            self.model.trigram_context[:batch_size] = trigram[:, :2]
            self.hidden_states[:batch_size] = anchor
            self.model.draft_step.fill_(step)
            with set_forward_context(
                attn_metadata,
                self.vllm_config,
                num_tokens=input_batch_size,
                num_tokens_across_dp=batch_size_across_dp,
                cudagraph_runtime_mode=cudagraph_mode,
                slot_mapping=self._get_slot_mapping(input_batch_size),
            ):
                features = self.model(
                    input_ids=self.input_ids[:input_batch_size],
                    positions=self._get_positions(input_batch_size),
                    hidden_states=self.hidden_states[:input_batch_size],
                    last_step=step == num_steps - 1,
                )
            token, token_probs = self._sample_draft_tokens(features[:batch_size], sampling_metadata)
            tokens.append(token)
            probs.append(token_probs)
            trigram = torch.cat([trigram[:, 1:], token.long()[:, None]], dim=1)
        if probs[0] is not None:
            self._last_draft_probs = torch.stack(probs, dim=1).contiguous()
        return torch.stack(tokens, dim=1)

    def _write_context(
        self, token_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, cad: CommonAttentionMetadata
    ) -> None:
        """The target's tokens and the keys/values of its hidden states, at this step's slots."""
        n = token_ids.shape[0]
        slots = cad.slot_mapping[:n]
        self.slot_tokens[slots] = token_ids.to(torch.int32)
        with set_forward_context(None, self.vllm_config, num_tokens=n, slot_mapping=self._get_slot_mapping(n, slots)):
            self.model.write_context(hidden[:n], positions[:n])

    def _lookup(
        self, last: torch.Tensor, next_token_ids: torch.Tensor, cad: CommonAttentionMetadata, k: int
    ) -> list[list[int]]:
        """Prompt-lookup drafts of up to k tokens per request ([] where nothing matches), over its
        verified tokens (positions 0..last, from the token side-cache) and the newest one."""
        length = int(last.max()) + 2
        positions = torch.minimum(torch.arange(length, device=last.device)[None], last[:, None])
        contexts = self._token_at(positions, cad)
        contexts[torch.arange(len(last), device=last.device), last + 1] = next_token_ids.long()
        lengths = (last + 2).to(torch.int32).cpu().numpy()
        return self.lookup.propose(contexts.to(torch.int32).cpu().numpy(), lengths, k, self.max_model_len)

    def _mark_lookup_drafts(self, found: list[list[int]]) -> None:
        """Where the draft model sampled its tokens, the lookup's rows get certain ones (probability 1)."""
        probs = self._last_draft_probs
        if probs is None:
            return
        k = max(probs.shape[1], *(len(f) for f in found))
        marked = probs.new_zeros(probs.shape[0], k, probs.shape[2])
        marked[:, : probs.shape[1]] = probs
        for row, tokens in enumerate(found):
            if tokens:
                marked[row, : len(tokens)] = 0
                marked[row, torch.arange(len(tokens)), torch.tensor(tokens)] = 1
        self._last_draft_probs = marked

    def _token_at(self, positions: torch.Tensor, cad: CommonAttentionMetadata) -> torch.Tensor:
        """The tokens at positions [B] or [B, N] of each request, from the token side-cache."""
        return self.slot_tokens[slots_of(positions, cad.block_table_tensor, self.block_size)].long()
