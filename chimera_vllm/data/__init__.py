"""The prompt sets this project ships, as package data (SOURCES.md names each source and licence).

They travel inside the package so that a plain ``pip install .`` can run the demo and the
benchmarks with no checkout beside it.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
MT_BENCH = DATA_DIR / "mt_bench_questions.jsonl"
"""MT-bench's 80 questions: the held-out evaluation set (never trained on; make-data refuses it)."""
PROMPT_OPENERS = DATA_DIR / "prompt_openers.txt"
"""The first words of the requests make-prompts has the target write, steering their kinds."""
