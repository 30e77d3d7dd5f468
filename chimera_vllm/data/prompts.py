"""Prompt files.

``.jsonl`` (optionally ``.jsonl.gz``), one object per line, in any of these shapes:

- ``{"prompt": "raw text"}``: raw text (HumanEval's code prompts too);
- ``{"turns": ["first turn", ...]}``: MT-bench style, the first turn as a chat message;
- ``{"question": "..."}``: GSM8K, a chat message;
- ``{"instruction": "...", "instances": [{"input": "..."}]}``: self-instruct, a chat message
  (the instruction, then the first instance's input when it has one).

Any other file: plain text, one prompt per line. Blank lines are skipped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    source: str  # "file:line"
    text: str
    chat: bool  # rendered with the tokenizer's chat template
    category: str | None = None  # the record's "category" (MT-bench's eight), for per-category reports


def _from_record(obj: object) -> tuple[str, bool] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("prompt"), str):
        return obj["prompt"], False
    turns = obj.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0], True
    if isinstance(obj.get("question"), str):
        return obj["question"], True
    if isinstance(obj.get("instruction"), str):
        instances = obj.get("instances") or [{}]
        extra = instances[0].get("input", "") if isinstance(instances[0], dict) else ""
        return (obj["instruction"] + ("\n\n" + extra if extra else "")), True
    return None


def _lines(path: Path) -> list[str]:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return f.read().splitlines()
    return path.read_text().splitlines()


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    prompts = []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if not is_jsonl:
            prompts.append(Prompt(where, line, False))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from e
        found = _from_record(obj)
        if found is None:
            raise PromptFileError(
                f'{where}: expected {{"prompt": str}}, {{"turns": [str, ...]}}, {{"question": str}} '
                f'or {{"instruction": str}}'
            )
        category = obj.get("category")
        prompts.append(Prompt(where, *found, category if isinstance(category, str) else None))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def encode_chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def encode(tokenizer, prompt: Prompt, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt; chat=True renders every prompt as a chat message."""
    ids = (
        encode_chat(tokenizer, prompt.text)
        if (prompt.chat if chat is None else chat)
        else tokenizer(prompt.text).input_ids
    )
    if not ids:
        raise PromptFileError(f"{prompt.source}: the prompt is empty after tokenisation")
    return ids


def encode_prompts(path: str | Path, tokenizer, chat: bool | None = None) -> list[list[int]]:
    """Token ids of every prompt in a file (see the module docstring for the formats)."""
    return [encode(tokenizer, p, chat) for p in read_prompts(path)]
