"""The prompt sets this project ships, as package data (SOURCES.md names each source and licence).

They travel inside the package so that a plain ``pip install .`` can run the demo and the
benchmarks with no checkout beside it.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
MT_BENCH = DATA_DIR / "mt_bench_questions.jsonl"
"""MT-bench's 80 questions: a held-out evaluation set (never trained on; make-data refuses it)."""
HELDOUT_OTHER_KINDS = DATA_DIR / "heldout_other_kinds.jsonl"
"""48 requests of kinds MT-bench lacks, 12 each (category: summary, translation, passage-qa,
math-word-problem), written for this project: held out like MT-bench."""
PROMPT_OPENERS = DATA_DIR / "prompt_openers_more_kinds.txt"
"""The first words of the requests the recipe has the target write, steering their kinds: the 48 of
prompt_openers.txt (runs 8-10) and 10 for kinds MT-bench lacks (summaries of a given text,
translation, questions over a passage, math word problems)."""
