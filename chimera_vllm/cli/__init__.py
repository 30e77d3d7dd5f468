"""The chimera-vllm command line: one module per group of commands, shared options in options.py."""

from __future__ import annotations

import argparse
import sys

from chimera_vllm.cli import convert, decoding, installation, measure, recipe, training
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.environment import logs_to_stderr, use_offline_hub
from chimera_vllm.reference.fetch import FetchError

DESCRIPTION = "Chimera speculative decoding (arXiv 2402.15758) for vLLM: serve, measure and train drafts."
WORKFLOW = """\
in the order a user meets them:
  set up     fetch-target, drafts, doctor
  decode     serve, generate
  measure    demo, bench, bench-serving, profile-step, eval, make-tree
  train      recipe (all of these in one), make-prompts, make-data, init-draft, draft-vocab, train,
             plot-training
  convert    convert-official, export-medusa, export-eagle3

chimera-vllm COMMAND --help describes each command."""

GROUPS = (installation, decoding, measure, training, recipe, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera-vllm",
        description=DESCRIPTION,
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_vllm_args", False):
        args.vllm_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    use_offline_hub()
    logs_to_stderr()
    for option in ("draft", "init_draft", "eagle3"):
        if getattr(args, option, None):
            setattr(args, option, resolve_draft(getattr(args, option)))
    try:
        code = args.func(args)  # a command that finds what it checks wrong returns 1
    except (ValueError, FileNotFoundError, FetchError, TimeoutError) as e:  # our errors name the bad value
        print(f"chimera-vllm: error: {e}", file=sys.stderr)
        return 2
    return code or 0
