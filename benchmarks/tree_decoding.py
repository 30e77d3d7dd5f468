"""Draft trees against chains in the reference decoder (transformers), one request at a time.

    python benchmarks/tree_decoding.py --draft smollm2-135m-instruct \
        --methods none chain:2 chain:4 tree:3,2,1,1 tree:TREE.json [--num-prompts 16] [--rounds 2] \
        [--dtype bfloat16] [--out benchmarks/results/tree-decoding-cpu]

Every method decodes every prompt in turn, prompt by prompt, so the machine's drift falls on all
alike; ``--rounds`` repeats the whole. Prints and writes (OUT.json, OUT.md, OUT.png) output tokens/s,
mean accepted length τ, draft tokens verified per step, speedup over no draft and whether the greedy
outputs equal no draft's. vLLM verifies chains only: this is what trees would be worth to a decoder
that verifies them, on this machine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from chimera_vllm.bench.report import markdown, run_info, write_result_files  # noqa: E402
from chimera_vllm.data import MT_BENCH  # noqa: E402
from chimera_vllm.data.prompts import encode_prompts  # noqa: E402
from chimera_vllm.drafts import resolve_draft  # noqa: E402
from chimera_vllm.model.draft import ChimeraDraft  # noqa: E402
from chimera_vllm.model.tree import DraftTree  # noqa: E402
from chimera_vllm.reference.decoding import SpeculativeDecoder  # noqa: E402
from chimera_vllm.reference.target import eos_token_ids, load_target, load_tokenizer  # noqa: E402

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Tally:
    method: str
    nodes: int  # draft tokens verified a step
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    accepted: int = 0
    equal: int = 0  # prompts whose output equals no draft's


def decoder_for(method: str, target, draft) -> tuple[SpeculativeDecoder, int]:
    """'none', 'chain:K' or 'tree:SPEC' (branching or a JSON file) -> (decoder, draft tokens a step)."""
    kind, _, spec = method.partition(":")
    if kind == "none" and not spec:
        return SpeculativeDecoder(target), 0
    if kind == "chain" and spec.isdigit():
        return SpeculativeDecoder(target, draft, int(spec)), int(spec)
    if kind == "tree" and spec:
        tree = DraftTree.parse(spec)
        return SpeculativeDecoder(target, draft, tree=tree), tree.num_nodes
    raise ValueError(f"method {method!r}: use none, chain:K or tree:SPEC")


def plot(tallies: list[Tally], path: Path) -> None:
    fig, (speed, tau) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"tree of {t.nodes}" if t.method.startswith("tree:") else t.method for t in tallies]
    speed.bar(names, [t.tokens / t.seconds for t in tallies])
    speed.set_ylabel("output tokens/s (batch 1)")
    tau.bar(names, [1 + t.accepted / max(t.steps, 1) for t in tallies])
    tau.set_ylabel("mean accepted length τ")
    for ax in (speed, tau):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=TARGET)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompts", default=str(MT_BENCH))
    p.add_argument("--methods", nargs="+", default=["none", "chain:2", "chain:4", "tree:3,2,1,1"])
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="benchmarks/results/tree-decoding-cpu")
    args = p.parse_args(argv)
    if "none" not in args.methods:
        args.methods.insert(0, "none")  # every speedup needs its baseline

    tokenizer = load_tokenizer(args.target)
    target = load_target(args.target, args.dtype)
    draft = ChimeraDraft.from_pretrained(resolve_draft(args.draft), target.config, dtype=target.dtype)
    eos = eos_token_ids(tokenizer, target.generation_config)
    prompts = encode_prompts(args.prompts, tokenizer)[: args.num_prompts]
    decoders = {m: decoder_for(m, target, draft) for m in args.methods}
    tallies = {m: Tally(m, nodes) for m, (_, nodes) in decoders.items()}
    for prompt in tqdm([p for _ in range(args.rounds) for p in prompts], desc="prompts (every method)"):
        baseline = None
        for method, (decoder, _) in decoders.items():
            (output,), stats = decoder.generate([prompt], args.max_new_tokens, eos)
            t = tallies[method]
            t.tokens, t.seconds = t.tokens + stats.output_tokens, t.seconds + stats.wall_s
            t.steps, t.accepted = t.steps + stats.target_steps, t.accepted + stats.accepted_tokens
            baseline = output if method == "none" else baseline
            t.equal += output == baseline

    none = tallies["none"]
    rows, results = [], []
    for t in tallies.values():
        speed, tau = t.tokens / t.seconds, 1 + t.accepted / max(t.steps, 1)
        speedup = speed / (none.tokens / none.seconds)
        n = args.rounds * len(prompts)
        results.append({**vars(t), "tokens_per_s": speed, "mean_accepted_length": tau, "speedup": speedup})
        rows.append([t.method, str(t.nodes), f"{speed:.1f}", f"{tau:.2f}", f"{speedup:.2f}x", f"{t.equal}/{n}"])
    table = markdown(["method", "draft tokens a step", "tok/s", "τ", "speedup", "outputs equal to none's"], rows)
    print(table)
    out = Path(args.out)
    info = run_info("python benchmarks/tree_decoding.py " + " ".join(argv))
    body = f"{table}\n\n![]({out.name}.png)"
    write_result_files(out, "Draft trees in the reference decoder (batch 1)", info, {"rows": results}, body)
    plot(list(tallies.values()), out.with_suffix(".png"))


if __name__ == "__main__":
    main(sys.argv[1:])
