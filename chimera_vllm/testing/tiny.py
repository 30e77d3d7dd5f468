"""Tiny random targets with an offline character tokenizer, for tests and the smoke demo.

Nothing here downloads anything: the tokenizer is built from a fixed character
set with the `tokenizers` library, the model from a transformers config.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus chat special tokens."""
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_target_config(arch: str = "llama", vocab_size: int = 128, **overrides):
    """A 2-layer target with hidden 64, 2 query heads of dim 32 and 1 KV head (GQA)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(f"unknown tiny architecture {arch!r} (use llama or qwen2)")


def build_tiny_target(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, init_std: float = 0.5, **overrides
) -> Path:
    """Write a random tiny target (model + tokenizer) to out_dir and return the path.

    A large init_std gives peaked next-token distributions, so greedy decoding
    from the random model has few near-ties.
    """
    tokenizer = build_tokenizer()
    config = tiny_target_config(arch, vocab_size=len(tokenizer), initializer_range=init_std, **overrides)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_ADJECTIVES = ["red", "small", "quiet", "happy", "green", "old", "bright", "lazy", "brave", "cold"]
_NOUNS = ["cat", "river", "garden", "teacher", "engine", "window", "forest", "baker", "violin", "planet"]
_VERBS = ["sees", "follows", "paints", "likes", "builds", "finds", "moves", "hears", "keeps", "opens"]


def synthetic_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Lines of a tiny grammar ("the ADJ NOUN VERB the ADJ NOUN. " x 3): a learnable language."""
    g = torch.Generator().manual_seed(seed)

    def pick(words: list[str]) -> str:
        return words[int(torch.randint(len(words), (1,), generator=g))]

    def sentence() -> str:
        return f"the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)}."

    return [" ".join(sentence() for _ in range(3)) for _ in range(num_lines)]


def train_tiny_target(model_dir: str | Path, steps: int = 300, batch_size: int = 32, seed: int = 0) -> None:
    """Teach a tiny target the synthetic grammar, in place, so its outputs have structure to learn."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lines = synthetic_corpus(steps * batch_size // 4, seed)
    batch = tokenizer(lines, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(lines), (batch_size,), generator=g)
        ids, mask = batch.input_ids[idx], batch.attention_mask[idx]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(model_dir)


def grammar_prompts(tokenizer, num_prompts: int, seed: int) -> list[list[int]]:
    """Prefixes (10..29 characters) of synthetic-grammar lines, as token ids."""
    return [tokenizer(line[: 10 + i % 20]).input_ids for i, line in enumerate(synthetic_corpus(num_prompts, seed))]


def build_trained_pair(root: str | Path, target_steps: int = 150, draft_steps: int = 40) -> tuple[Path, Path]:
    """A tiny target taught the grammar and a Chimera draft distilled from its greedy outputs.

    Returns (target_dir, draft_dir). Takes ~15 s on 2 CPU cores.
    """
    from chimera_vllm.reference.decoding import SpeculativeDecoder
    from chimera_vllm.reference.target import load_target
    from chimera_vllm.training.data import Sequence, write_sequences
    from chimera_vllm.training.trainer import TrainArgs, train

    root = Path(root)
    target_dir = build_tiny_target(root / "target", "llama", init_std=0.02)
    train_tiny_target(target_dir, steps=target_steps)
    target = load_target(str(target_dir))
    prompts = grammar_prompts(PreTrainedTokenizerFast.from_pretrained(target_dir), 512, seed=7)
    outputs, _ = SpeculativeDecoder(target).generate(prompts, 48)
    data = root / "data.jsonl"
    write_sequences(data, [Sequence(p + o, len(p)) for p, o in zip(prompts, outputs)])
    draft_dir = train(
        TrainArgs(
            target=str(target_dir),
            data=str(data),
            out=str(root / "draft"),
            steps=draft_steps,
            batch_size=16,
            lr=3e-3,
            save_every=10**9,
            resume=False,
            progress=False,
        )
    )
    return target_dir, draft_dir
