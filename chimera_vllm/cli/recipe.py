"""``chimera-vllm recipe``: prompts, answers, training, evaluation and a model card in one command."""

from __future__ import annotations

import argparse

from chimera_vllm.cli import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    from chimera_vllm.recipe.args import SERVED_BY, STAGES, RecipeArgs

    d = RecipeArgs(target="", out="")
    r = sub.add_parser(
        "recipe",
        help="train a draft of any kind for a target, from prompts it writes itself to an evaluated draft "
        "with a model card (each stage resumable; a second kind in the same --out reuses the data)",
        parents=[options.target(), options.seed()],
    )
    r.add_argument("--out", required=True, help="the recipe's folder: data at its top, each kind in OUT/KIND")
    r.add_argument("--head-type", choices=list(SERVED_BY), default=d.head_type, help="(default: residual, Chimera)")
    data = r.add_argument_group("data")
    data.add_argument("--prompts", nargs="+", help="prompt files to answer instead of prompts the target writes")
    data.add_argument("--num-prompts", type=int, default=d.num_prompts, help="prompts the target writes (samples)")
    data.add_argument("--openers", default=d.openers, help="make-prompts' openers (default: the shipped ones)")
    data.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length")
    data.add_argument("--data-dtype", default=d.data_dtype, help="the target's dtype writing prompts and answers")
    data.add_argument("--data-batch-size", type=int, default=d.data_batch_size)
    data.add_argument("--data-engine", choices=["vllm", "hf"], default=d.data_engine)
    tr = r.add_argument_group("training")
    tr.add_argument("--num-heads", type=int, default=d.num_heads, help="most tokens drafted a step")
    tr.add_argument("--steps", type=int, default=d.steps)
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences a step (each process)")
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    tr.add_argument("--draft-vocab-size", type=int, default=d.draft_vocab_size)
    tr.add_argument("--labels", choices=["data", "target"], default=d.labels)
    tr.add_argument("--max-length", type=int, default=d.max_length, help="tokens a sequence (prompts: half)")
    tr.add_argument("--train-dtype", default=d.train_dtype)
    tr.add_argument("--save-dtype", default=d.save_dtype)
    tr.add_argument("--nproc", type=int, default=d.nproc, help="training processes (torchrun when > 1)")
    tr.add_argument(
        "--no-hidden-cache",
        dest="hidden_cache",
        action="store_false",
        help="run the target every step instead of caching its hidden states (cheaper below ~one epoch)",
    )
    ev = r.add_argument_group("evaluation (vLLM, greedy, float32)")
    ev.add_argument(
        "--eval-prompts",
        nargs="+",
        default=d.eval_prompts,
        help="held-out prompt files, τ by their categories (default: MT-bench turn 1, the requests of other kinds)",
    )
    ev.add_argument("--eval-num-prompts", type=int, default=d.eval_num_prompts, help="the first N of each file")
    ev.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    ev.add_argument("--eval-ks", type=int, nargs="+", default=d.eval_ks, help="draft tokens a step to measure")
    ev.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    r.add_argument("--stop-after", choices=STAGES, help="stop after this stage (a rerun without it goes on)")
    r.set_defaults(func=cmd_recipe)


def cmd_recipe(args: argparse.Namespace) -> None:
    from chimera_vllm.recipe.args import RecipeArgs
    from chimera_vllm.recipe.run import recipe

    kind = recipe(options.dataclass_args(RecipeArgs, args))
    if args.stop_after:
        print(f"stopped after {args.stop_after}: {args.out}/stages.json lists the finished stages")
        return
    print((kind / "README.md").read_text())
    print(f"the draft, its evaluation and its card are in {kind}")
