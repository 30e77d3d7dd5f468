"""The target's final hidden states of every training sequence, computed once and kept on disk.

The target is frozen, so its hidden states are the same in every epoch; on a CPU
its forward pass is about a third of a training step. The cache is one
safetensors file: ``hidden`` [total tokens, H] (the sequences back to back, in
the target's dtype), for an EAGLE-3 draft ``aux`` [total tokens, 3H] (the layers
it reads), and ``offsets`` [N + 1]. Its metadata names the target, the data file
(size and modification time), the truncation length and the aux layers; a cache
that does not match them is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from chimera_vllm.reference.target import final_and_aux_hidden
from chimera_vllm.training.data import Sequence, collate


def cache_key(
    target_name: str, data_path: str | Path, max_length: int, dtype: torch.dtype, aux_layers: list[int] | None = None
) -> dict[str, str]:
    stat = Path(data_path).stat()
    key = {
        "target": target_name,
        "data": str(Path(data_path).resolve()),
        "data_size": str(stat.st_size),
        "data_mtime_ns": str(stat.st_mtime_ns),
        "max_length": str(max_length),
        "dtype": str(dtype),
    }
    if aux_layers:
        key["aux_layers"] = json.dumps(aux_layers)
    return key


class HiddenCache:
    """Read access to a cache file: padded [B, T, H] batches of chosen sequences."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self.offsets = self._file.get_tensor("offsets").tolist()

    def metadata(self) -> dict[str, str]:
        return self._file.metadata() or {}

    def batch(self, indices: list[int], T: int, name: str = "hidden") -> Tensor:
        """States ``name`` ("hidden" or "aux") of sequences `indices`, right-padded with zeros to T positions."""
        states = self._file.get_slice(name)
        rows = [states[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        out = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
        for b, r in enumerate(rows):
            out[b, : len(r)] = r[:T]
        return out


def build_hidden_cache(
    target: nn.Module,
    sequences: list[Sequence],
    path: str | Path,
    key: dict[str, str],
    batch_size: int = 8,
    progress: bool = True,
) -> HiddenCache:
    """Run the target over every sequence (longest first, to pad little) and write the cache."""
    path = Path(path)
    aux_layers = json.loads(key.get("aux_layers", "null"))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    hidden: list[Tensor | None] = [None] * len(sequences)
    aux: list[Tensor | None] = [None] * len(sequences)
    device = next(target.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="target hidden states", disable=not progress):
        chunk = order[start : start + batch_size]
        ids, attn, _ = collate([sequences[i] for i in chunk])
        with torch.no_grad():
            h, a = final_and_aux_hidden(target, ids.to(device), aux_layers, attn.long().to(device))
        for b, i in enumerate(chunk):
            hidden[i] = h[b, : len(sequences[i].input_ids)].cpu()
            aux[i] = None if a is None else a[b, : len(sequences[i].input_ids)].cpu()
    lengths = torch.tensor([0] + [len(s.input_ids) for s in sequences])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    states = {"hidden": torch.cat(hidden), "offsets": lengths.cumsum(0)}
    if aux_layers:
        states["aux"] = torch.cat(aux)
    save_file(states, str(tmp), metadata=key)
    tmp.rename(path)
    return HiddenCache(path)


def open_hidden_cache(
    target: nn.Module, sequences: list[Sequence], path: str | Path, key: dict[str, str], progress: bool = True
) -> HiddenCache:
    """The cache at path if it was built for this target and data, else a freshly built one."""
    path = Path(path)
    if path.is_file():
        try:
            cache = HiddenCache(path)
            if cache.metadata() == key and len(cache.offsets) == len(sequences) + 1:
                return cache
            reason = f"it was built for {json.dumps(cache.metadata())}"
        except (SafetensorError, OSError, KeyError) as e:  # a truncated or foreign file
            reason = f"it cannot be read ({e})"
        print(f"rebuilding the hidden-state cache {path}: {reason}")
    return build_hidden_cache(target, sequences, path, key, progress=progress)
