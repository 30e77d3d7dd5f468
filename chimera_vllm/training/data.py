"""Training data: token-id sequences, one JSON object per line.

Format (``.jsonl``)::

    {"input_ids": [1, 17, 42, ...], "prompt_length": 12}

``input_ids`` is the whole sequence (prompt + the target's response);
``prompt_length`` (optional, default 0) says how many leading tokens are
context only: the loss covers predicting tokens at index >= max(prompt_length, 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class DataFormatError(ValueError):
    """A training data file is malformed; the message names the file and line."""


@dataclass
class Sequence:
    input_ids: list[int]
    prompt_length: int = 0


def read_sequences(path: str | Path, vocab_size: int | None = None, max_length: int | None = None) -> list[Sequence]:
    """Read and validate a token-id JSONL file (sequences longer than max_length are truncated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training data file at {path}")
    sequences = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e.msg})") from e
            ids = obj.get("input_ids") if isinstance(obj, dict) else None
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise DataFormatError(f'{where}: expected {{"input_ids": [int, ...]}}')
            if len(ids) < 2:
                raise DataFormatError(f"{where}: a sequence needs at least 2 tokens, got {len(ids)}")
            if vocab_size is not None and any(t < 0 or t >= vocab_size for t in ids):
                bad = next(t for t in ids if t < 0 or t >= vocab_size)
                raise DataFormatError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
            prompt_length = obj.get("prompt_length", 0)
            if not isinstance(prompt_length, int) or not 0 <= prompt_length < len(ids):
                raise DataFormatError(f"{where}: prompt_length={prompt_length!r} must be in [0, {len(ids)})")
            sequences.append(Sequence(ids[:max_length] if max_length else ids, prompt_length))
    if not sequences:
        raise DataFormatError(f"{path}: no sequences")
    return sequences


def response_token_counts(paths: list[str], vocab_size: int) -> Tensor:
    """How often each token of the vocabulary occurs in the responses (after prompt_length) of the data files."""
    responses = [seq.input_ids[seq.prompt_length :] for path in paths for seq in read_sequences(path, vocab_size)]
    return torch.bincount(torch.tensor([t for r in responses for t in r], dtype=torch.long), minlength=vocab_size)


def frequent_response_tokens(paths: list[str], vocab_size: int, size: int) -> tuple[Tensor, float]:
    """The size most frequent tokens of the responses in the data files, and the share of all
    response tokens they cover."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"--size must be in 1..{vocab_size} (the target's vocabulary), got {size}")
    counts = response_token_counts(paths, vocab_size)
    seen = int((counts > 0).sum())
    if size > seen:  # the rest would be arbitrary tokens the data never uses
        raise ValueError(
            f"a draft vocabulary of {size} tokens: the responses in {', '.join(map(str, paths))} hold only {seen} "
            f"distinct tokens; ask for at most {seen}, or use more data"
        )
    top = counts.topk(size)
    return top.indices, float(top.values.sum() / counts.sum().clamp(min=1))


def response_coverage(paths: list[str], vocab_size: int, token_ids: Tensor) -> float:
    """The share of the response tokens in the data files that are among token_ids (a draft vocabulary)."""
    counts = response_token_counts(paths, vocab_size)
    return float(counts[token_ids.cpu()].sum() / counts.sum().clamp(min=1))


def write_sequences(path: str | Path, sequences: list[Sequence]) -> None:
    with Path(path).open("w") as f:
        for s in sequences:
            f.write(json.dumps({"input_ids": s.input_ids, "prompt_length": s.prompt_length}) + "\n")


def collate(batch: list[Sequence], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad a batch -> input_ids, attention_mask, label_mask, each [B, T].

    label_mask[b, p] is True where token p is a real response token to predict.
    """
    T = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(batch), T, dtype=torch.bool)
    label = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, s in enumerate(batch):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = True
        label[i, max(s.prompt_length, 1) : n] = True
    return ids, attn, label


def batch_indices(
    num_sequences: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1
) -> list[int]:
    """The sequence indices of one rank's share of global batch `step`.

    Epoch e visits the sequences in a permutation fixed by (seed, e), so a run
    resumed at any step sees exactly the batches it would have seen.
    """
    global_batch = batch_size * world
    per_epoch = max(num_sequences // global_batch, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = offset * global_batch + rank * batch_size
    return [int(perm[(start + i) % num_sequences]) for i in range(batch_size)]
