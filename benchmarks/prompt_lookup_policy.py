"""Would drafting from the request's own text beside the Chimera draft pay? An estimate.

    python benchmarks/prompt_lookup_policy.py [--num-prompts 80] [--out OUT]

Greedy decoding keeps exactly the drafts that match the target's own continuation, so one
target pass over each (prompt, greedy continuation) of MT-bench turn 1 and the draft's
teacher-forced drafts replay any drafting policy exactly
(``chimera_vllm.prompt_lookup.simulate_greedy_steps``, float32, the transformers reference):
the Chimera draft alone at K tokens, vLLM's n-gram proposer alone at K, and prompt lookup
first (up to K tokens) with the draft model's D tokens where it finds no match
(``chimera+ngram:K:D``); with ``--min-probabilities``, also each Chimera policy whose draft
model stops at its first token below that probability (``...@c``). Each policy's steps are
priced by the cost model of benchmarks/draft_confidence_policy.py (default: batch 1, float32,
the AVX2 profile); the lookup itself is taken as free. An estimate, not a measurement in vLLM: `chimera-vllm bench
--methods chimera+ngram:K:D` measures one. Prints a table; writes OUT.json and OUT.md.
"""

import argparse
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# its neighbour: run as a script, its own folder is sys.path[0]
from draft_confidence_policy import CostModel, add_common_arguments, load_inputs
from tqdm.auto import tqdm

from chimera_vllm.prompt_lookup import PromptLookup, SimulatedStep, simulate_greedy_steps
from chimera_vllm.prompts import read_prompts


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


def policies(max_k: int, heads: int, min_probabilities: list[float]) -> list[tuple[str, int, bool, int | None, float]]:
    """(method, K, lookup on, draft-model tokens or None for no draft model, its minimum probability)."""
    chimera = [(f"chimera:{k}", k, False, k) for k in range(1, heads + 1)]
    for k in range(1, max_k + 1):
        chimera += [(f"chimera+ngram:{k}:{d}", k, True, d) for d in range(1, min(k, heads) + 1)]
    out = [(f"ngram:{k}", k, True, None, 0.0) for k in (1, 2, 4, max_k)]
    out += [(*plan, 0.0) for plan in chimera]
    out += [(f"{plan[0]}@{c:g}", *plan[1:], c) for c in min_probabilities for plan in chimera]
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


def main() -> None:
    from chimera_vllm.bench import markdown, run_info, write_result_files
    from chimera_vllm.decoding import SpeculativeDecoder
    from chimera_vllm.evaluate import confident_lengths, draft_predictions, greedy_accepts
    from chimera_vllm.vllm_engine import NGRAM_LOOKUP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--max-k", type=int, default=6, help="the most tokens a policy drafts per step")
    parser.add_argument(
        "--min-probabilities",
        type=float,
        nargs="*",
        default=[],
        help="also price each Chimera policy with its draft model stopping at the first token below each",
    )
    lookup_help = "the lookup's shortest/longest match (vLLM's n-gram settings; default: its own)"
    parser.add_argument("--prompt-lookup-min", type=int, default=NGRAM_LOOKUP["prompt_lookup_min"], help=lookup_help)
    parser.add_argument("--prompt-lookup-max", type=int, default=NGRAM_LOOKUP["prompt_lookup_max"], help=lookup_help)
    args = parser.parse_args()
    target, tokenizer, draft, prompts, cost = load_inputs(args)
    heads = draft.config.num_heads
    eos = {tokenizer.eos_token_id}
    continuations = []
    for start in tqdm(range(0, len(prompts), 16), desc="target's greedy answers", unit="batch"):
        batch = prompts[start : start + 16]
        continuations += SpeculativeDecoder(target).generate(batch, args.max_new_tokens + args.max_k, eos)[0]
    lookup = PromptLookup(args.prompt_lookup_min, args.prompt_lookup_max)
    plans = policies(args.max_k, heads, args.min_probabilities)
    categories = [p.category or "(no category)" for p in read_prompts(args.prompts)]
    steps: dict[str, list[SimulatedStep]] = {method: [] for method, *_ in plans}
    by_category: dict[str, dict[str, list[SimulatedStep]]] = {m: defaultdict(list) for m in BY_CATEGORY}
    for i, (prompt, continuation) in enumerate(tqdm(list(zip(prompts, continuations)), desc="replay", unit="prompt")):
        tokens = prompt + continuation
        top1, probability = draft_predictions(target, draft, tokens, len(prompt), heads)
        accepts = greedy_accepts(top1, tokens)
        for method, k, lookup_on, d, c in plans:
            policy_lookup = PromptLookup(lookup.min_n, lookup.max_n, d) if lookup_on else None
            model = None if d is None else accepts
            length = confident_lengths(probability, c) if c else None
            replayed = simulate_greedy_steps(
                tokens, len(prompt), args.max_new_tokens, k, model, policy_lookup, draft_model_length=length
            )
            steps[method] += replayed
            if method in by_category:
                by_category[method][categories[i]] += replayed
    estimates = [price(method, steps[method], cost) for method, *_ in plans]
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
