"""Long-context prompts: a long given text to summarise or to answer a question about, at ~2,000 and
~6,000 tokens of SmolLM2's tokenizer, for measuring how a draft's cost grows with the context.

    python benchmarks/make_long_prompts.py [--target HuggingFaceTB/SmolLM2-135M-Instruct]

The texts are this project's own documents (Apache-2.0), cut at a paragraph boundary below the
length; writes chimera_vllm/data/long_context_prompts.jsonl ({"turns": [...], "category": "2k-summary",
...}), which `chimera-vllm bench --prompts` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chimera_vllm.data import DATA_DIR
from chimera_vllm.reference.target import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("docs/training-smollm2.md", "docs/vllm-integration.md", "docs/results/vllm-cpu.md")
LENGTHS = {"2k": 2000, "6k": 6000}
ASKS = {
    "summary": "Summarize the following document in one paragraph.",
    "qa": "Read the following document, then answer: what problems did the authors run into, and how did "
    "they solve them?",
}


def cut(text: str, tokenizer, max_tokens: int) -> str:
    """The longest prefix of whole paragraphs of text within max_tokens tokens."""
    kept: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(tokenizer("\n\n".join([*kept, paragraph])).input_ids) > max_tokens:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="whose tokenizer counts")
    parser.add_argument("--out", default=str(DATA_DIR / "long_context_prompts.jsonl"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.target)
    rows = []
    for size, tokens in LENGTHS.items():
        for document in DOCUMENTS:
            text = cut((ROOT / document).read_text(), tokenizer, tokens - 60)
            for kind, ask in ASKS.items():
                rows.append({"category": f"{size}-{kind}", "source": document, "turns": [f"{ask}\n\n{text}"]})
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [len(tokenizer(r["turns"][0]).input_ids) for r in rows]
    print(f"wrote {len(rows)} prompts to {args.out}: {min(lengths)}..{max(lengths)} tokens")


if __name__ == "__main__":
    main()
