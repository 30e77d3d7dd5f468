"""The Chimera draft's cost per engine step in vLLM on a CPU, its matmuls on vLLM's small-GEMM
kernel for a few rows (chimera_vllm/vllm_cpu_gemm.py) against vLLM's own GEMM dispatch.

    VLLM_CPU_NUM_OF_RESERVED_CPU=0 python benchmarks/draft_gemm.py [--num-prompts 8] \
        [--num-speculative-tokens 4] [--rounds 4] [--out benchmarks/results/draft-gemm-avx512]

One engine, in this process (so that wall-clock timers see the model runner: no profiler and its
overhead), generates for the same prompts with the two settings in turn, ``--rounds`` times; the
setting is the kernel's row limit, read at every call. This machine's noise moves whole runs by
±15%, so compare the two settings within a round. Prints and writes (OUT.json, OUT.md) ms per
engine step of the target forward, the draft proposal and its context write, and per draft token
the draft model (its trigram encoder and encoder layer within it), the draft LM head with its
arg-max, and vLLM's attention metadata for the step. On a CPU where the kernel is not chosen
(float32, AVX2 only) the two settings are the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from chimera_vllm.data import MT_BENCH

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
SETTINGS = {"small-GEMM kernel": 8, "vLLM's dispatch": 0}  # SMALL_GEMM_MAX_ROWS
RUNNER, DRAFT = "vllm.v1.worker.gpu_model_runner", "chimera_vllm.vllm.model"
EAGLE = "vllm.v1.spec_decode.eagle"
STEP, TOKEN = "target forward", "draft model forward"  # one call per engine step; one per draft token
TIMED = {  # label: (module, class, method, the label whose calls divide it: per engine step or per draft token)
    STEP: (RUNNER, "GPUModelRunner", "_model_forward", STEP),
    "draft proposal": (RUNNER, "GPUModelRunner", "propose_draft_token_ids", STEP),
    "write context": (DRAFT, "ChimeraDraftForVLLM", "write_context", STEP),
    TOKEN: (DRAFT, "ChimeraDraftForVLLM", "forward", TOKEN),
    "trigram encoder": (DRAFT, "ChimeraDraftForVLLM", "_trigram", TOKEN),
    "encoder layer": (DRAFT, "ChimeraEncoderLayer", "forward", TOKEN),
    "draft LM head + arg-max": (DRAFT, "ChimeraDraftForVLLM", "greedy_tokens", TOKEN),
    "attention metadata": (EAGLE, "EagleProposer", "build_per_group_and_layer_attn_metadata", TOKEN),
}


class Timers:
    """Total seconds and calls of each TIMED method, since the last reset."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        import importlib

        for label, (module, cls, name, _) in TIMED.items():
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, name, self._timed(label, getattr(owner, name)))

    def _timed(self, label: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def ms(self, label: str) -> float:
        """Milliseconds per engine step or per draft token (TIMED)."""
        return 1e3 * self.seconds[label] / max(self.calls[TIMED[label][3]], 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=TARGET)
    p.add_argument("--draft", default="smollm2-135m-instruct")
    p.add_argument("--prompts", default=str(MT_BENCH))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where the timers are
    from chimera_vllm.bench.report import run_info, write_result_files
    from chimera_vllm.data.prompts import encode_prompts
    from chimera_vllm.drafts import resolve_draft
    from chimera_vllm.environment import use_offline_hub
    from chimera_vllm.reference.target import load_tokenizer
    from chimera_vllm.vllm import cpu_gemm as vllm_cpu_gemm
    from chimera_vllm.vllm.engine import chimera_spec, close_llm, generate, make_llm, warm_up

    use_offline_hub()
    prompts = encode_prompts(args.prompts, load_tokenizer(args.target))[: args.num_prompts]
    timers = Timers()
    timers.install()
    k = args.num_speculative_tokens
    llm = make_llm(args.target, chimera_spec(resolve_draft(args.draft), k), dtype=args.dtype, max_num_seqs=1)
    rows = []
    try:
        warm_up(llm, prompts[0])
        for round_ in range(1, args.rounds + 1):
            for setting, max_rows in SETTINGS.items():
                vllm_cpu_gemm.SMALL_GEMM_MAX_ROWS = max_rows
                timers.reset()
                outputs, stats = generate(llm, prompts, args.max_new_tokens, num_speculative_tokens=k)
                row = {"round": round_, "setting": setting, "tok_s": stats.output_tokens / stats.wall_s}
                row.update({label: timers.ms(label) for label in TIMED})
                rows.append(row)
                print(row, flush=True)
    finally:
        close_llm(llm)
    table = markdown_table(rows)
    print(table)
    if args.out:
        info = run_info("python benchmarks/draft_gemm.py " + " ".join(sys.argv[1:]))
        info.update(target=args.target, draft=args.draft, dtype=args.dtype, batch_size=1, num_speculative_tokens=k)
        info.update(num_prompts=len(prompts), max_new_tokens=args.max_new_tokens)
        title = "The draft's cost per engine step in vLLM: vLLM's small-GEMM kernel against vLLM's dispatch"
        write_result_files(Path(args.out), title, info, {"rows": rows}, table)


def markdown_table(rows: list[dict]) -> str:
    """Every run, then each setting's median; ms per engine step, the draft's parts per draft token."""
    columns = ["tok_s", *TIMED]
    units = ["tok/s"] + [f"{label} (ms/{'step' if per == STEP else 'token'})" for label, (*_, per) in TIMED.items()]
    lines = ["| round | setting | " + " | ".join(units) + " |", "|---|---|" + "---|" * len(columns)]
    lines += [f"| {r['round']} | {r['setting']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + " |" for r in rows]
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        medians = [statistics.median(r[c] for r in mine) for c in columns]
        lines.append(f"| median | {setting} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
