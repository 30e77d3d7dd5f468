"""Options shared by several commands, each defined once as an argparse parent parser.

A command takes the parents it needs (``parents=[target(), dtype("bfloat16")]``); where two
commands need another default, the parent takes it as an argument, never a second definition.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from chimera_vllm.config import HEAD_TYPES, TRIGRAM_MLPS
from chimera_vllm.data import MT_BENCH


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def target(required: bool = True, default: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    text = "target model: a directory or an offline hub name" + (f" (default: {default})" if default else "")
    p.add_argument("--target", required=required and default is None, default=default, help=text)
    return p


def draft(
    required: bool = False,
    help: str = "Chimera draft: a directory or a shipped draft's name",
    default: str | None = None,
) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--draft", required=required, default=default, help=help)
    return p


def dtype(default: str, why: str = "") -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--dtype", default=default, help=f"(default: {default}{why})")
    return p


def device() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--device", default="cpu", help="(transformers engine) e.g. cuda")
    return p


def prompts(required: bool = False, help: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    default = None if required else str(MT_BENCH)
    text = help or ".jsonl with prompt/turns per line, or text with one prompt a line (default: MT-bench's questions)"
    p.add_argument("--prompts", required=required, default=default, help=text)
    return p


def max_new_tokens(default: int = 128) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--max-new-tokens", type=int, default=default)
    return p


def seed() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--seed", type=int, default=0)
    return p


def temperature(default: float = 0.0) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--temperature", type=float, default=default, help="0: greedy")
    return p


def batch_size(default: int) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--batch-size", type=int, default=default)
    return p


def as_json() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def max_model_len(default: int | None) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--max-model-len", type=int, default=default, help="(vLLM) context length")
    return p


def enforce_eager() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(vLLM) default: eager on a CPU, compiled on a GPU",
    )
    return p


def draft_tokens() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="draft tokens per step (default: the draft's heads)"
    )
    return p


TREE_HELP = (
    "draft a tree of tokens each step (the reference decoder): branching factors per depth "
    "(3,2,1,1) or a JSON file of rank paths (chimera-vllm make-tree)"
)


def tree() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--tree", help=TREE_HELP)
    return p


def draft_shape() -> argparse.ArgumentParser:
    """The architecture of a fresh draft (docs/architecture.md); a continued one keeps its own."""
    p = _parent()
    p.add_argument("--num-heads", type=int, help="draft heads = most tokens drafted per step (default: 4)")
    p.add_argument("--trigram-mlp", choices=TRIGRAM_MLPS, help="(default: resblock)")
    p.add_argument("--head-type", choices=HEAD_TYPES, help="(default: residual)")
    p.add_argument(
        "--intermediate-size", type=int, help="the full-context encoder's MLP width (default: 4x the target's hidden)"
    )
    return p


ENGINE_METHODS_HELP = (
    "none, ngram:K, suffix[:K] (vLLM's suffix decoding), chimera:K, chimera+ngram:K[:D] (prompt lookup beside "
    "the draft, D draft-model tokens), "
    "medusa:K, eagle3:K (vLLM's own proposers, with --medusa / --eagle3); chimera methods take @N: speculate "
    "only while at most N requests run (chimera:2@4, as serve "
    "--max-speculative-batch 4)"
)


def engine_methods(default: list[str], extra_help: str = "") -> argparse.ArgumentParser:
    """The target, the drafts and the methods a benchmark runs one engine each."""
    p = argparse.ArgumentParser(
        add_help=False,
        parents=[target(), draft(help="Chimera draft (for chimera methods): a directory or a shipped draft's name")],
    )
    p.add_argument("--medusa", help="Medusa heads in vLLM's format, from export-medusa (for medusa:K methods)")
    p.add_argument(
        "--eagle3",
        help="an EAGLE-3 draft in the speculators format, from export-eagle3, or a shipped one's name (eagle3:K)",
    )
    p.add_argument("--methods", nargs="+", default=default, help=ENGINE_METHODS_HELP + extra_help)
    return p


def rounds(help: str) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--rounds", type=int, default=1, help=help)
    return p


def report_out(required: bool = False, what: str = "OUT.json, OUT.md and OUT.png") -> argparse.ArgumentParser:
    """--out, and where vLLM's log goes: OUT.log beside the report unless --show-vllm-log."""
    p = _parent()
    p.add_argument("--out", required=required, help=f"write {what}, and vLLM's log to OUT.log")
    p.add_argument("--show-vllm-log", action="store_true", help="vLLM's log on the console, not in OUT.log")
    return p


def vllm_log_beside_report(args: argparse.Namespace):
    """A context: with --out and without --show-vllm-log, vLLM's log goes to OUT.log meanwhile."""
    from pathlib import Path

    from chimera_vllm.environment import vllm_log_to_file

    return vllm_log_to_file(Path(args.out).with_suffix(".log") if args.out and not args.show_vllm_log else None)


def dataclass_args(cls: type, args: argparse.Namespace) -> Any:
    """cls(**the parsed options that are cls's fields)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def method_drafts(args: argparse.Namespace) -> dict[str, str | None]:
    """The drafts an engine_methods parser was given, by the method kind that runs each."""
    return {"chimera": args.draft, "medusa": args.medusa, "eagle3": args.eagle3}
