"""Which drafting policy pays: prompt lookup beside the Chimera draft, fewer draft tokens where
the draft is unsure? An estimate.

    python benchmarks/prompt_lookup_policy.py [--num-prompts 80] [--out OUT]

Greedy decoding keeps exactly the drafts that match the target's own continuation, so one
target pass over each (prompt, greedy continuation) of MT-bench turn 1 and the draft's
teacher-forced drafts replay any drafting policy exactly
(``chimera_vllm.vllm.prompt_lookup.simulate_greedy_steps``, float32, the transformers reference):
the Chimera draft alone at K tokens, vLLM's n-gram proposer alone at K, and prompt lookup
first (up to K tokens) with the draft model's D tokens where it finds no match
(``chimera+ngram:K:D``); with ``--min-probabilities``, also each Chimera policy whose draft
model stops at its first token below that probability (``...@c``; ``...@c keep m`` with
``--keep-at-least m``: its first m tokens whatever their probability). Each policy's steps are
priced by a cost model of one engine step (default: batch 1, float32, the AVX2 profile in
benchmarks/results/profile-step-fp32-batch1-avx2.md); the lookup itself is taken as free. An
estimate, not a measurement in vLLM: `chimera-vllm bench --methods chimera+ngram:K:D` measures
one. Prints a table; writes OUT.json and OUT.md.
"""

import argparse
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from chimera_vllm.data import MT_BENCH
from chimera_vllm.data.prompts import encode, read_prompts
from chimera_vllm.vllm.engine import NGRAM_LOOKUP
from chimera_vllm.vllm.prompt_lookup import PromptLookup, SimulatedStep, simulate_greedy_steps


@dataclass
class CostModel:
    target_ms: list[float]  # a target forward with 1, 2, ... query tokens (the last increment extends it)
    draft_step_ms: float
    overhead_ms: float  # the rest of an engine step: scheduler, sampler, input preparation
    draft_fixed_ms: float = 0.0  # a proposal's cost beside its draft steps (context writes, metadata)

    def target(self, query_tokens: int) -> float:
        known = len(self.target_ms)
        if query_tokens <= known:
            return self.target_ms[query_tokens - 1]
        step = self.target_ms[-1] - self.target_ms[-2] if known > 1 else 0.0
        return self.target_ms[-1] + step * (query_tokens - known)

    def step(self, query_tokens: int, draft_steps: int) -> float:
        draft = self.draft_fixed_ms + self.draft_step_ms * draft_steps if draft_steps else 0.0
        return self.overhead_ms + self.target(query_tokens) + draft


@dataclass
class Estimate:
    method: str
    tau: float  # tokens per target step
    lookup_share: float  # steps the lookup drafted
    draft_steps: float  # draft-model steps per target step
    ms_per_step: float
    speedup: float


def price(method: str, steps: list[SimulatedStep], cost: CostModel) -> Estimate:
    n = len(steps)
    ms = sum(cost.step(s.drafted + 1, s.draft_model_steps) for s in steps) / n
    tau = sum(s.accepted + 1 for s in steps) / n
    looked_up = sum(s.drafted > 0 and s.draft_model_steps == 0 for s in steps) / n
    return Estimate(method, tau, looked_up, sum(s.draft_model_steps for s in steps) / n, ms, tau / ms * cost.step(1, 0))


class Plan(NamedTuple):
    method: str
    k: int  # tokens drafted per step, at most
    lookup: bool
    draft_tokens: int | None  # the draft model's tokens per step; None: no draft model
    min_probability: float = 0.0  # the draft model stops at its first token below it
    min_tokens: int = 0  # ... keeping its first min_tokens whatever their probability


def policies(max_k: int, heads: int, min_probabilities: list[float], keep_at_least: list[int]) -> list[Plan]:
    """vLLM's n-gram alone, the Chimera draft alone and beside the lookup, and each Chimera policy
    with every (minimum probability, tokens kept whatever their probability) where the two differ
    from its fixed share."""
    chimera = [Plan(f"chimera:{k}", k, False, k) for k in range(1, heads + 1)]
    for k in range(1, max_k + 1):
        chimera += [Plan(f"chimera+ngram:{k}:{d}", k, True, d) for d in range(1, min(k, heads) + 1)]
    out = [Plan(f"ngram:{k}", k, True, None) for k in sorted({1, 2, 4, max_k})] + chimera
    for c in min_probabilities:
        for m in keep_at_least:
            suffix = f"@{c:g}" + (f" keep {m}" if m else "")
            out += [
                p._replace(method=p.method + suffix, min_probability=c, min_tokens=m)
                for p in chimera
                if m < p.draft_tokens
            ]
    return out


BY_CATEGORY = ("chimera:1", "ngram:4", "chimera+ngram:4:1")
"""The policies priced per category of the prompts (MT-bench's eight) as well."""


def category_table(steps: dict[str, dict[str, list[SimulatedStep]]], cost: CostModel) -> tuple[list[str], list]:
    """(header, rows): per category, τ and estimated speedup of each BY_CATEGORY policy and the
    lookup's share of the hybrid's steps, the hybrid's weakest category first."""
    header = ["category"] + [f"{m} τ / est." for m in BY_CATEGORY] + [f"{BY_CATEGORY[-1]} lookup drafted"]
    priced = {c: [price(m, steps[m][c], cost) for m in BY_CATEGORY] for c in steps[BY_CATEGORY[0]]}
    rows = [
        [c] + [f"{e.tau:.2f} / {e.speedup:.2f}x" for e in estimates] + [f"{estimates[-1].lookup_share:.2f}"]
        for c, estimates in sorted(priced.items(), key=lambda item: item[1][-1].speedup)
    ]
    return header, rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--draft", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(MT_BENCH))
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-k", type=int, default=6, help="the most tokens a policy drafts per step")
    parser.add_argument(
        "--min-probabilities",
        type=float,
        nargs="*",
        default=[],
        help="also price each Chimera policy with its draft model stopping at the first token below each",
    )
    parser.add_argument(
        "--keep-at-least",
        type=int,
        nargs="+",
        default=[0],
        help="with --min-probabilities: the draft model's first tokens kept whatever their probability (each)",
    )
    lookup_help = "the lookup's shortest/longest match (vLLM's n-gram settings; default: its own)"
    parser.add_argument("--prompt-lookup-min", type=int, default=NGRAM_LOOKUP["prompt_lookup_min"], help=lookup_help)
    parser.add_argument("--prompt-lookup-max", type=int, default=NGRAM_LOOKUP["prompt_lookup_max"], help=lookup_help)
    cost = parser.add_argument_group("the cost model of one engine step, in ms (default: batch 1, float32, AVX2)")
    cost.add_argument("--target-ms", type=float, nargs="+", default=[65.2, 69.6, 78.0], help="1, 2, ... query tokens")
    cost.add_argument("--draft-step-ms", type=float, default=9.5)
    cost.add_argument("--overhead-ms", type=float, default=11.0, help="scheduler, sampler, input preparation")
    cost.add_argument("--draft-fixed-ms", type=float, default=0.0, help="a proposal's cost beside its draft steps")
    parser.add_argument("--out", default=None)


def main() -> None:
    from transformers import AutoTokenizer

    from chimera_vllm.bench.report import markdown, run_info, write_result_files
    from chimera_vllm.drafts import resolve_draft
    from chimera_vllm.evaluation.acceptance import UNCATEGORISED, confident_lengths, draft_predictions, greedy_accepts
    from chimera_vllm.model.draft import ChimeraDraft
    from chimera_vllm.reference.decoding import SpeculativeDecoder
    from chimera_vllm.reference.target import load_target

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    target = load_target(args.target)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    draft = ChimeraDraft.from_pretrained(resolve_draft(args.draft), target.config).float().eval()
    records = read_prompts(args.prompts)[: args.num_prompts]
    prompts = [encode(tokenizer, r) for r in records]
    cost = CostModel(args.target_ms, args.draft_step_ms, args.overhead_ms, args.draft_fixed_ms)
    heads = draft.config.num_heads
    eos = {tokenizer.eos_token_id}
    continuations = []
    for start in tqdm(range(0, len(prompts), 16), desc="target's greedy answers", unit="batch"):
        batch = prompts[start : start + 16]
        continuations += SpeculativeDecoder(target).generate(batch, args.max_new_tokens + args.max_k, eos)[0]
    lookup = PromptLookup(args.prompt_lookup_min, args.prompt_lookup_max)
    plans = policies(args.max_k, heads, args.min_probabilities, args.keep_at_least)
    categories = [r.category or UNCATEGORISED for r in records]
    steps: dict[str, list[SimulatedStep]] = {plan.method: [] for plan in plans}
    by_category: dict[str, dict[str, list[SimulatedStep]]] = {m: defaultdict(list) for m in BY_CATEGORY}
    for i, (prompt, continuation) in enumerate(tqdm(list(zip(prompts, continuations)), desc="replay", unit="prompt")):
        tokens = prompt + continuation
        top1, probability = draft_predictions(target, draft, tokens, len(prompt), heads)
        accepts = greedy_accepts(top1, tokens)
        for plan in plans:
            policy_lookup = PromptLookup(lookup.min_n, lookup.max_n, plan.draft_tokens) if plan.lookup else None
            model = None if plan.draft_tokens is None else accepts
            length = (
                confident_lengths(probability, plan.min_probability, plan.min_tokens) if plan.min_probability else None
            )
            replayed = simulate_greedy_steps(
                tokens, len(prompt), args.max_new_tokens, plan.k, model, policy_lookup, draft_model_length=length
            )
            steps[plan.method] += replayed
            if plan.method in by_category:
                by_category[plan.method][categories[i]] += replayed
    estimates = [price(plan.method, steps[plan.method], cost) for plan in plans]
    header = ["method", "τ", "lookup drafted", "draft-model steps", "est. ms/step", "est. speedup"]
    rows = [
        [e.method, f"{e.tau:.2f}", f"{e.lookup_share:.2f}", f"{e.draft_steps:.2f}", f"{e.ms_per_step:.1f}"]
        + [f"{e.speedup:.2f}x"]
        for e in estimates
    ]
    table = markdown(header, rows)
    if args.max_k >= 4 and len(by_category[BY_CATEGORY[0]]) > 1:
        table += "\n\nBy the prompts' category (the hybrid's weakest first):\n\n"
        table += markdown(*category_table(by_category, cost))
    print(table)
    if args.out:
        info = run_info("python benchmarks/prompt_lookup_policy.py " + " ".join(sys.argv[1:]))
        info.update(target=args.target, draft=args.draft, prompts=args.prompts, num_prompts=len(prompts))
        info.update(cost_model=asdict(cost), lookup=asdict(lookup))
        title = "Prompt lookup beside the Chimera draft: estimated speedup (greedy replay, cost model)"
        write_result_files(Path(args.out), title, info, {"estimates": [asdict(e) for e in estimates]}, table)


if __name__ == "__main__":
    with torch.no_grad():
        main()
