"""Commands that make a draft for a target: prompts, data, a fresh draft, its vocabulary, training."""

from __future__ import annotations

import argparse
from pathlib import Path

from chimera_vllm.cli import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_make_prompts(sub)
    _add_make_data(sub)
    i = sub.add_parser(
        "init-draft",
        help="write an untrained Chimera draft for a target",
        parents=[options.target(), options.draft_shape(), options.seed(), options.dtype("float32")],
    )
    i.add_argument("--out", required=True)
    i.set_defaults(func=cmd_init_draft)

    d = sub.add_parser(
        "draft-vocab",
        help="restrict a draft to the N most frequent response tokens of the data (cheaper steps)",
        parents=[options.draft(required=True)],
    )
    d.add_argument("--data", required=True, nargs="+", help="token-id JSONL files (make-data's output)")
    d.add_argument("--size", type=int, required=True, help="number of target tokens the draft may propose")
    d.add_argument("--out", help="write the restricted draft here (default: in place)")
    d.set_defaults(func=cmd_draft_vocab)

    _add_train(sub)

    pt = sub.add_parser("plot-training", help="training curves of several trained drafts side by side (PNG)")
    pt.add_argument("runs", nargs="+", help="folders written by train --out")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.set_defaults(func=cmd_plot_training)


def _add_make_prompts(sub: argparse._SubParsersAction) -> None:
    mp = sub.add_parser(
        "make-prompts",
        help="chat prompts written by the target itself (Magpie), for make-data",
        parents=[
            options.target(),
            options.max_new_tokens(),
            options.temperature(1.0),
            options.seed(),
            options.batch_size(256),
            options.dtype("bfloat16"),
            options.device(),
        ],
    )
    mp.add_argument("--out", required=True, help='prompt JSONL to write ({"turns": [text]} lines; a rerun resumes)')
    mp.add_argument("--count", type=int, required=True, help="samples to draw (repeats, unfinished ones dropped)")
    mp.add_argument("--min-chars", type=int, default=16, help="drop shorter prompts (not counting the opener)")
    mp.add_argument(
        "--openers",
        help="a file of openers, one a line (e.g. chimera_vllm/data/prompt_openers.txt): sample i starts with "
        "opener i mod n, steering the kinds of request the target writes",
    )
    _add_data_engine(mp)
    mp.set_defaults(func=cmd_make_prompts)


def _add_make_data(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "make-data",
        help="self-distillation data: the target's answers to chat prompts",
        parents=[
            options.target(),
            options.max_new_tokens(256),
            options.temperature(),
            options.seed(),
            options.batch_size(32),
            options.dtype("bfloat16"),
            options.device(),
        ],
    )
    m.add_argument("--prompts", required=True, nargs="+", help="prompt files (chimera_vllm/data/prompts.py)")
    m.add_argument("--out", required=True, help="token-id JSONL to write (appended to: a rerun resumes)")
    m.add_argument("--limit", type=int, default=None, help="use this many prompts (a seeded sample)")
    m.add_argument("--max-prompt-tokens", type=int, default=None, help="skip prompts longer than this (chat-rendered)")
    _add_data_engine(m)
    m.set_defaults(func=cmd_make_data)


def _add_data_engine(parser: argparse.ArgumentParser) -> None:
    """The engine that writes prompts or answers: the reference decoder (hf) or vLLM."""
    parser.add_argument("--engine", choices=["vllm", "hf"], default="hf")


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train a Chimera draft by distillation (runs under torchrun too)",
        parents=[
            options.target(),
            options.draft_shape(),
            options.seed(),
            options.dtype("float32"),
            options.batch_size(8),
        ],
    )
    t.add_argument("--data", required=True, help='token-id JSONL: {"input_ids": [...], "prompt_length": n} per line')
    t.add_argument("--out", required=True)
    t.add_argument("--init-draft", help="start from this draft (a path or a shipped draft's name), not a fresh one")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=int, default=20)
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument(
        "--max-positions",
        type=int,
        default=None,
        help="train each head on at most this many random positions per step (cheaper for large vocabularies)",
    )
    t.add_argument("--step-decay", type=float, default=0.8, help="loss weight of head k is decay**k")
    t.add_argument("--mse-weight", type=float, default=1.0)
    t.add_argument("--kl-weight", type=float, default=0.0)
    t.add_argument(
        "--labels",
        choices=["data", "target"],
        default="data",
        help="what each head learns to propose: the data's next tokens, or the target's greedy choice after "
        "the data's prefix (what greedy verification accepts; differs from the data on sampled answers)",
    )
    t.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="draft (and train the heads) over the data's N most frequent response tokens only; without it an "
        "--init-draft keeps its own draft vocabulary",
    )
    t.add_argument(
        "--hidden-cache",
        default=None,
        help="file for the target's hidden states of the data: computed once, reused by every epoch and resume",
    )
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the final draft's weights in this dtype (bfloat16: half the size, as the shipped draft); "
        "checkpoints keep training's",
    )
    t.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=cmd_train)


def cmd_make_prompts(args: argparse.Namespace) -> None:
    from chimera_vllm.training.make_data import MakePromptsArgs, make_prompts

    out = make_prompts(options.dataclass_args(MakePromptsArgs, args))
    print(f"{len(out.read_text().splitlines())} distinct prompts written to {out}")


def cmd_make_data(args: argparse.Namespace) -> None:
    from chimera_vllm.training.make_data import MakeDataArgs, make_data

    out = make_data(options.dataclass_args(MakeDataArgs, args))
    print(f"training data written to {out}")


def cmd_init_draft(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import draft_shape_options, init_draft
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = init_draft(target, args.target, seed=args.seed, **draft_shape_options(args))
    draft.save_pretrained(args.out)
    print(f"wrote an untrained Chimera draft ({draft.num_heads} heads) for {args.target} to {args.out}")


def cmd_draft_vocab(args: argparse.Namespace) -> None:
    from chimera_vllm.model.base import DraftModel
    from chimera_vllm.training.data import frequent_response_tokens

    draft = DraftModel.from_pretrained(args.draft)
    ids, coverage = frequent_response_tokens(args.data, draft.config.vocab_size, args.size)
    draft.set_draft_vocab(ids)
    out = args.out or args.draft
    draft.save_pretrained(out)
    print(f"draft vocabulary: {args.size} tokens cover {coverage:.1%} of the response tokens in the data; wrote {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from chimera_vllm.training.trainer import TrainArgs, train

    out = train(options.dataclass_args(TrainArgs, args))
    print(f"trained draft written to {out}")


def cmd_plot_training(args: argparse.Namespace) -> None:
    from chimera_vllm.training.trainer import plot_runs, read_train_log

    plot_runs({Path(run).name: read_train_log(Path(run)) for run in args.runs}, Path(args.out))
    print(f"wrote {args.out}")
