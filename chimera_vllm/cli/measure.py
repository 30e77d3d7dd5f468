"""Commands that measure: the demo, throughput, serving, a step's profile, and a draft's acceptance."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chimera_vllm.cli import options
from chimera_vllm.cli.decoding import load_inputs, parse_tree


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_demo(sub)
    _add_bench(sub)
    _add_bench_serving(sub)
    _add_soak(sub)
    _add_profile_step(sub)
    e = sub.add_parser(
        "eval",
        help="mean accepted length, acceptance by position, head top-1/top-5 (greedy, the reference decoder)",
        parents=[
            options.target(),
            options.draft(required=True),
            options.prompts(required=True),
            options.draft_tokens(),
            options.tree(),
            options.max_new_tokens(),
            options.batch_size(16),
            options.dtype("float32"),
            options.device(),
            options.as_json(),
        ],
    )
    e.set_defaults(func=cmd_eval)
    mt = sub.add_parser(
        "make-tree",
        help="the draft tree most likely to be accepted, from the heads' ranks on the target's answers",
        parents=[
            options.target(),
            options.draft(required=True),
            options.prompts(required=True, help="prompts to measure on (not the ones you evaluate on)"),
            options.max_new_tokens(),
            options.batch_size(16),
            options.dtype("float32"),
            options.device(),
        ],
    )
    mt.add_argument("--nodes", type=int, required=True, help="draft tokens the target verifies a step")
    mt.add_argument("--depth", type=int, default=None, help="longest path (default: the draft's heads)")
    mt.add_argument("--out", required=True, help="JSON file of the tree's rank paths (for --tree)")
    mt.set_defaults(func=cmd_make_tree)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from chimera_vllm.bench.demo import DRAFT, TARGET

    p = sub.add_parser(
        "demo",
        help="the shipped draft in vLLM on MT-bench turn 1, against no speculation (what `make demo` runs)",
        parents=[
            options.target(default=TARGET),
            options.draft(default=DRAFT),
            options.prompts(),
            options.max_new_tokens(),
            options.batch_size(4),
            options.dtype("float32", ": outputs reproducible token for token"),
        ],
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=24,
        help="prompts taken evenly across the file (MT-bench: 3 of each category's 10 questions); 80: all",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=1,
        help="the draft model's tokens per step; 1: on a CPU in float32 a second draft token costs more than "
        "it gains (docs/vllm-integration.md)",
    )
    p.add_argument(
        "--lookup-tokens",
        type=int,
        default=4,
        help="prompt lookup beside the draft: where the text so far matches, up to this many tokens of what "
        "followed the match (0: off)",
    )
    p.add_argument("--out", default="runs/demo/mt-bench", help="report prefix: OUT.md, OUT.json, OUT.png, OUT.log")
    p.add_argument("--show-vllm-log", action="store_true", help="vLLM's log on the console, not in OUT.log")
    p.set_defaults(func=cmd_demo)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="vLLM offline throughput with and without speculation",
        parents=[
            options.engine_methods(["none", "ngram:4", "chimera:4"], "; hf: transformers' generate at batch 1"),
            options.prompts(),
            options.max_new_tokens(),
            options.max_model_len(2048),
            options.enforce_eager(),
            options.rounds(
                "run every engine N times, the methods alternating within each round (a machine's speed drifts "
                "between engines minutes apart): the report gives each setting's medians and its per-round "
                "speedups' range"
            ),
            options.report_out(),
        ],
    )
    b.add_argument("--num-prompts", type=int, default=None)
    b.add_argument(
        "--tune-schedule",
        action="store_true",
        help="then run chimera:auto: vLLM's batch-size schedule with the fastest measured K per batch size, "
        "and chimera+ngram:K:D:auto for each chimera+ngram method: per batch size the fastest of itself, "
        "a measured chimera:k with k <= D (its drafts capped at k) and no speculation",
    )
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    b.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    b.add_argument("--temperatures", type=float, nargs="+", default=[0.0])
    b.set_defaults(func=cmd_bench)


def _add_bench_serving(sub: argparse._SubParsersAction) -> None:
    bs = sub.add_parser(
        "bench-serving",
        help="the OpenAI-compatible server under load: TTFT, TPOT, latency percentiles; "
        "other arguments go to vLLM's server",
        parents=[
            options.engine_methods(["none", "chimera:2"]),
            options.prompts(),
            options.max_new_tokens(),
            options.temperature(),
            options.dtype("bfloat16"),
            options.max_model_len(2048),
            options.rounds("start every server this many times, methods alternating, and report medians"),
            options.report_out(),
        ],
    )
    bs.add_argument("--num-prompts", type=int, default=40, help="requests per load (the first N prompts)")
    bs.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16], help="loads: requests in flight")
    bs.add_argument(
        "--request-rates", type=float, nargs="*", default=[1.0, 4.0], help="loads: Poisson arrivals, requests/s"
    )
    bs.add_argument("--timeout", type=float, default=600, help="seconds one load may take")
    bs.set_defaults(func=cmd_bench_serving, takes_vllm_args=True)


def _add_soak(sub: argparse._SubParsersAction) -> None:
    from chimera_vllm.bench.demo import DRAFT, TARGET

    s = sub.add_parser(
        "soak",
        help="the OpenAI server with and without the draft under the same long mixed traffic, with dropped "
        "streams, requests to refuse and faulty drafts: nothing lost or leaked, greedy outputs identical",
        parents=[
            options.target(default=TARGET),
            options.draft(default=DRAFT),
            options.prompts(help="prompt texts the traffic draws from (default: MT-bench's questions)"),
            options.draft_tokens(),
            options.dtype("float32", ": greedy outputs comparable token for token"),
            options.max_model_len(2048),
            options.seed(),
            options.report_out(what="OUT.json and OUT.md"),
        ],
    )
    s.add_argument("--duration", type=float, default=600, help="seconds of traffic per server")
    s.add_argument("--max-requests", type=int, default=4000, help="requests per server at most")
    s.add_argument("--max-tokens", type=int, default=48, help="the longest answer a request asks for")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="levels the phases cycle through")
    s.add_argument(
        "--faulty-drafts",
        action="store_true",
        help="also serve a draft of NaN weights and one of random weights, and try three damaged drafts "
        "the server must refuse at start-up",
    )
    s.set_defaults(func=cmd_soak)


def _add_profile_step(sub: argparse._SubParsersAction) -> None:
    pp = sub.add_parser(
        "profile-step",
        help="where an engine step's time goes: vLLM's torch profiler summed by component",
        parents=[
            options.engine_methods(["none", "chimera:2"]),
            options.prompts(),
            options.max_new_tokens(),
            options.temperature(),
            options.batch_size(1),
            options.dtype("bfloat16"),
            options.max_model_len(2048),
            options.report_out(required=True, what="OUT.json and OUT.md, and the traces under OUT-traces/"),
        ],
    )
    pp.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="default: the batch size, so that every request starts at once and its prefill falls in the "
        "four unprofiled first steps",
    )
    pp.add_argument("--steps", type=int, default=48, help="engine steps to profile, after the first four")
    pp.set_defaults(func=cmd_profile_step)


def _show_and_write(rows: list, markdown_table, write_report, args: argparse.Namespace, inputs: tuple) -> None:
    """Print a benchmark's table; with --out, write its report with the named inputs beside it."""
    print(markdown_table(rows))
    if args.out:
        write_report(rows, Path(args.out), _command(), {name: getattr(args, name) for name in inputs})
        print(f"written to {args.out}.json, .md and .png")


def _command() -> str:
    return "chimera-vllm " + " ".join(sys.argv[1:])


def cmd_demo(args: argparse.Namespace) -> None:
    from chimera_vllm.bench.demo import run_demo

    run_demo(args, _command())


def _encoded_prompts(args: argparse.Namespace, limit: int | None):
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer

    tokenizer = load_tokenizer(args.target)
    eos = eos_token_ids(tokenizer, generation_config(args.target))
    return encode_prompts(args.prompts, tokenizer)[:limit], eos


def cmd_bench(args: argparse.Namespace) -> None:
    from chimera_vllm.bench.methods import parse_methods
    from chimera_vllm.bench.throughput import markdown_table, run, write_report

    methods = parse_methods(args.methods)
    prompts, eos = _encoded_prompts(args, args.num_prompts)
    with options.vllm_log_beside_report(args):
        rows = run(
            args.target,
            options.method_drafts(args),
            prompts,
            methods,
            args.batch_sizes,
            args.dtypes,
            args.temperatures,
            args.max_new_tokens,
            eos,
            tune_schedule=args.tune_schedule,
            rounds=args.rounds,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
        )
    _show_and_write(rows, markdown_table, write_report, args, ("target", "draft", "medusa", "eagle3", "prompts"))


def cmd_bench_serving(args: argparse.Namespace) -> None:
    from chimera_vllm.bench.methods import parse_methods
    from chimera_vllm.bench.serving import Load, markdown_table, run, server_args, write_report

    loads = [Load(concurrency=c) for c in args.concurrency] + [Load(request_rate=r) for r in args.request_rates]
    with options.vllm_log_beside_report(args):
        rows = run(
            args.target,
            options.method_drafts(args),
            parse_methods(args.methods),
            loads,
            args.prompts,
            args.num_prompts,
            args.max_new_tokens,
            server_args(args.dtype, args.max_model_len, args.vllm_args),
            args.temperature,
            args.timeout,
            rounds=args.rounds,
        )
    _show_and_write(rows, markdown_table, write_report, args, ("target", "draft", "prompts", "dtype"))


def cmd_soak(args: argparse.Namespace) -> int:
    from chimera_vllm.bench.soak.report import SoakSettings, soak, write_report

    settings = SoakSettings(
        args.target, args.draft, args.prompts, args.num_speculative_tokens, args.duration,
        args.max_requests, args.max_model_len, args.max_tokens, args.dtype, args.seed, args.faulty_drafts,
        tuple(args.concurrency),
    )  # fmt: skip
    out = Path(args.out or "runs/soak/soak")
    results = soak(settings, out)
    write_report(results, out, _command())
    print(out.with_suffix(".md").read_text())
    return 0 if results["passed"] else 1


def cmd_profile_step(args: argparse.Namespace) -> None:
    from chimera_vllm.bench.methods import parse_methods
    from chimera_vllm.bench.step_profile import markdown_table, write_report

    out = Path(args.out)
    methods = dict(zip(args.methods, parse_methods(args.methods)))
    traces = {text: out.with_name(f"{out.name}-traces") / text.replace(":", "-") for text in methods}
    for trace_dir in traces.values():
        if trace_dir.exists():
            raise ValueError(f"{trace_dir} exists: profile-step writes each trace to a new folder; give another --out")
    prompts, eos = _encoded_prompts(args, args.num_prompts or args.batch_size)
    with options.vllm_log_beside_report(args):
        profiles = _profiles(args, methods, traces, prompts, eos)
    print(markdown_table(profiles))
    extra = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "dtype": args.dtype}
    extra |= {"temperature": args.temperature, "batch_size": args.batch_size, "num_prompts": len(prompts)}
    write_report(profiles, out, _command(), extra)
    print(f"written to {out}.json and .md; traces (chrome://tracing, Perfetto) under {out}-traces/")


def _profiles(args: argparse.Namespace, methods: dict, traces: dict, prompts: list, eos: set) -> dict:
    from chimera_vllm.bench.step_profile import profile_engine

    return {
        text: profile_engine(
            args.target,
            method,
            options.method_drafts(args),
            prompts,
            traces[text],
            args.dtype,
            args.batch_size,
            args.max_new_tokens,
            eos,
            args.steps,
            args.temperature,
            max_model_len=args.max_model_len,
        )
        for text, method in methods.items()
    }


def cmd_eval(args: argparse.Namespace) -> None:
    from chimera_vllm.data.prompts import read_prompts
    from chimera_vllm.evaluation.acceptance import evaluate
    from chimera_vllm.reference.target import eos_token_ids

    tokenizer, prompts, target, draft = load_inputs(args)
    tree = parse_tree(args)
    k = args.num_speculative_tokens or (tree.depth if tree else draft.num_heads)
    result = evaluate(
        target,
        draft,
        prompts,
        k,
        args.max_new_tokens,
        eos_token_ids(tokenizer, target.generation_config),
        args.batch_size,
        progress=not args.json,
        categories=[p.category for p in read_prompts(args.prompts)],
        tree=tree,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    drafted = f"K={k}" if tree is None else f"a tree of {tree.num_nodes} nodes, {k} deep"
    print(
        f"{result.num_prompts} prompts, {drafted}: mean accepted length {result.mean_accepted_length:.3f} "
        f"(outputs identical to the target's: {'yes' if result.outputs_identical else 'NO'})"
    )
    print(result.text_report(k))


def cmd_make_tree(args: argparse.Namespace) -> None:
    from chimera_vllm.evaluation.acceptance import best_tree
    from chimera_vllm.reference.target import eos_token_ids

    tokenizer, prompts, target, draft = load_inputs(args)
    tree, probability = best_tree(
        target,
        draft,
        prompts,
        args.nodes,
        args.depth or draft.num_heads,
        args.max_new_tokens,
        eos_token_ids(tokenizer, target.generation_config),
        args.batch_size,
        progress=True,
    )
    tree.save(args.out)
    print(
        f"{args.out}: {tree.num_nodes} nodes, {tree.depth} deep; expected mean accepted length "
        f"{tree.expected_accepted_length(probability):.2f} (depths taken as independent)"
    )
