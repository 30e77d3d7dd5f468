"""Would drafting fewer tokens where the draft is unsure pay? An estimate from the reference decoder.

    python benchmarks/draft_confidence_policy.py [--num-prompts 80] [--out OUT]

Decodes MT-bench turn 1 greedily with a Chimera draft at K tokens (float32, the transformers
reference decoder) and records, at every target step, the draft's probability of each token it
drafted (softmax over its vocabulary) and how many of them the target accepted. Drafting greedily
the first K' <= K tokens gives the same tokens, so one run prices every policy "draft at most K'
tokens, stop at the first whose probability is below c (keeping at least m)": its tokens per
target step, the query tokens the target verifies and the draft steps it runs, priced by a cost
model of one engine step (default: batch 1, float32, the AVX2 profile in
benchmarks/results/profile-step-fp32-batch1-avx2.md). An estimate, not a measurement in vLLM.
Prints a table; writes OUT.json and OUT.md.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass
class Policy:
    max_tokens: int
    min_tokens: int
    threshold: float
    tau: float = 0.0  # tokens per target step
    draft_steps: float = 0.0  # per target step
    ms_per_step: float = 0.0
    speedup: float = 0.0


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


def record_steps(target, draft, prompts: list[list[int]], k: int, eos: set[int], max_new_tokens: int) -> list[dict]:
    """Per target step: the draft's probability of each of its k tokens, and how many were accepted."""
    from chimera_vllm.decoding import SpeculativeDecoder

    decoder = SpeculativeDecoder(target, draft, k)
    steps, last = [], {}
    propose, verify = draft.propose, decoder.sampler.verify

    def propose_recording(*args):
        tokens, logits = propose(*args[:-1], lambda step, logits: logits.argmax(dim=-1))
        last["probability"] = logits.float().softmax(dim=-1).amax(dim=-1)
        return tokens, None  # greedy verification, as without the recording

    def verify_recording(drafts, draft_logits, target_logits):
        accepted, next_token = verify(drafts, draft_logits, target_logits)
        for p, a in zip(last["probability"].tolist(), accepted.tolist()):
            steps.append({"probability": p, "accepted": a})
        return accepted, next_token

    draft.propose, decoder.sampler.verify = propose_recording, verify_recording
    try:
        for prompt in tqdm(prompts, unit="prompt"):
            decoder.generate([prompt], max_new_tokens, eos)
    finally:
        del draft.propose  # back to the class's method
    return steps


def price(policy: Policy, steps: list[dict], cost: CostModel) -> Policy:
    tokens = draft_steps = ms = 0.0
    for s in steps:
        kept = policy.min_tokens
        while kept < policy.max_tokens and s["probability"][kept] >= policy.threshold:
            kept += 1
        run = min(kept + 1, policy.max_tokens)  # the first token below the threshold was drafted too
        tokens += 1 + min(s["accepted"], kept)
        draft_steps += run
        ms += cost.step(kept + 1, run)
    n = len(steps)
    policy.tau, policy.draft_steps, policy.ms_per_step = tokens / n, draft_steps / n, ms / n
    policy.speedup = policy.tau / policy.ms_per_step * cost.step(1, 0)
    return policy


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The target, draft, prompts and the cost model's step profile (batch 1, float32, AVX2)."""
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--draft", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default="data/mt_bench_questions.jsonl")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--target-ms", type=float, nargs="+", default=[65.2, 69.6, 78.0])
    parser.add_argument("--draft-step-ms", type=float, default=9.5)
    parser.add_argument("--overhead-ms", type=float, default=11.0)
    parser.add_argument("--draft-fixed-ms", type=float, default=0.0)
    parser.add_argument("--out", default=None)


def load_inputs(args: argparse.Namespace):
    """(target, tokenizer, float32 draft, encoded prompts, cost model) from add_common_arguments'."""
    from transformers import AutoTokenizer

    from chimera_vllm.drafts import resolve_draft
    from chimera_vllm.model import ChimeraDraft
    from chimera_vllm.prompts import encode_prompts
    from chimera_vllm.target import load_target

    target = load_target(args.target)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    draft = ChimeraDraft.from_pretrained(resolve_draft(args.draft), target.config).float().eval()
    prompts = encode_prompts(args.prompts, tokenizer)[: args.num_prompts]
    return (
        target,
        tokenizer,
        draft,
        prompts,
        CostModel(args.target_ms, args.draft_step_ms, args.overhead_ms, args.draft_fixed_ms),
    )


def main() -> None:
    from chimera_vllm.bench import markdown, run_info, write_result_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args()
    target, tokenizer, draft, prompts, cost = load_inputs(args)
    k = args.num_speculative_tokens
    steps = record_steps(target, draft, prompts, k, {tokenizer.eos_token_id}, args.max_new_tokens)
    policies = [
        price(Policy(kmax, m, c), steps, cost)
        for kmax in range(1, k + 1)
        for m in (0, 1)
        for c in args.thresholds
        if not (c == 0.0 and m == 0)  # the same as m = 1: every token has a probability >= 0
    ]
    header = ["max K", "min tokens", "threshold", "τ", "draft steps", "est. ms/step", "est. speedup"]
    table = markdown(
        header,
        [
            [str(p.max_tokens), str(p.min_tokens), f"{p.threshold:.1f}", f"{p.tau:.2f}", f"{p.draft_steps:.2f}"]
            + [f"{p.ms_per_step:.1f}", f"{p.speedup:.2f}x"]
            for p in policies
        ],
    )
    print(table)
    if args.out:
        info = run_info("python benchmarks/draft_confidence_policy.py " + " ".join(sys.argv[1:]))
        info.update(target=args.target, draft=args.draft, prompts=args.prompts, target_steps=len(steps))
        info.update(cost_model=asdict(cost))
        title = "Drafting fewer tokens where the draft is unsure: estimated speedup (reference decoder, cost model)"
        results = {"policies": [asdict(p) for p in policies]}
        write_result_files(Path(args.out), title, info, results, table)


if __name__ == "__main__":
    with torch.no_grad():
        main()
