"""The recipe's options, apart from the stages so that the command line reads them without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chimera_vllm.data import HELDOUT_OTHER_KINDS, MT_BENCH, PROMPT_OPENERS

STAGES = ("prompts", "answers", "train", "export", "evaluate")
"""The recipe's stages in order (a kind's model card follows the last one)."""

SERVED_BY = {"residual": "chimera", "eagle3": "eagle3", "medusa": "medusa"}
"""The method that serves each kind of draft in vLLM (the bench's method names)."""


@dataclass
class RecipeArgs:
    target: str
    out: str
    head_type: str = "residual"
    # prompts
    prompts: list[str] | None = None  # prompt files to answer; None: the target writes num_prompts
    num_prompts: int = 4000  # samples the target draws (fewer distinct prompts are kept)
    openers: str | None = str(PROMPT_OPENERS)
    seed: int = 0
    # answers
    max_new_tokens: int = 256
    data_dtype: str = "bfloat16"
    data_batch_size: int = 256
    data_engine: str = "vllm"
    # training
    num_heads: int = 4
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    draft_vocab_size: int | None = None
    labels: str = "target"
    max_length: int = 512
    train_dtype: str = "float32"
    save_dtype: str | None = "bfloat16"
    nproc: int = 1
    hidden_cache: bool = True  # the target's hidden states computed once (pays off past ~one epoch)
    # evaluation
    eval_prompts: list[str] = field(default_factory=lambda: [str(MT_BENCH), str(HELDOUT_OTHER_KINDS)])
    eval_num_prompts: int | None = None  # the first N of each file (None: all)
    eval_max_new_tokens: int = 128
    eval_ks: list[int] = field(default_factory=lambda: [2, 4])
    eval_batch_size: int = 16
    stop_after: str | None = None  # a stage of STAGES: e.g. the data made here, the training elsewhere
    progress: bool = True


def served_draft(args: RecipeArgs, kind: Path) -> str:
    """The directory vLLM serves the draft from."""
    return str(kind / ("train" if args.head_type == "residual" else "vllm"))
