"""Prompt files: JSONL with "prompt" (raw text) or "turns" (chat), or plain text, one prompt a line."""

from __future__ import annotations

import json
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file is malformed; the message names the file and line."""


def read_prompt_texts(path: str | Path) -> list[tuple[int, str, bool]]:
    """(line number, text, is_chat) for every prompt; chat prompts are MT-bench first turns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    prompts = []
    is_jsonl = path.suffix == ".jsonl"
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append((lineno, line, False))
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from e
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append((lineno, obj["prompt"], False))
        elif isinstance(obj, dict) and isinstance(obj.get("turns"), list) and obj["turns"] and isinstance(obj["turns"][0], str):
            prompts.append((lineno, obj["turns"][0], True))
        else:
            raise PromptFileError(f'{where}: expected {{"prompt": str}} or {{"turns": [str, ...]}}')
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def encode_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of every prompt: raw text as is, chat turns through the tokenizer's chat template."""
    encoded = []
    for lineno, text, is_chat in read_prompt_texts(path):
        if is_chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer(text).input_ids
        if not ids:
            raise PromptFileError(f"{path}:{lineno}: the prompt is empty after tokenisation")
        encoded.append(ids)
    return encoded
