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


def prompt_file(name_or_path: str | Path) -> Path:
    """A prompt file given by path, or by the file name of a shipped set (``mt_bench_questions.jsonl``)."""
    path = Path(name_or_path)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = DATA_DIR / path.name
    return shipped if shipped.exists() else path
