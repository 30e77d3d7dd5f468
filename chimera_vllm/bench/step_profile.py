"""Where the time of one engine step goes: vLLM's torch profiler, summed by component.

One engine per method runs the same prompts under ``LLM.start_profile()``; the worker's
trace (Chrome JSON) is then summed by the functions and modules below and divided by the
number of target forward passes, so every figure is milliseconds per engine step. A
component counts once even where its function calls itself or a same-named function
(vLLM's ``propose_draft_token_ids`` calls another one), and components nest as listed: a
child counts only inside its parent (the draft's encoder layer runs vLLM's attention too, but
only the target's counts under "target forward"), so its time is part of its parent's.

The profiled steps should all be alike: the command starts as many requests as the batch
holds, all at once, so that their prefills fall in the unprofiled first steps, and lets them
generate enough tokens that none ends inside the profiled ones. The profiler slows every
step (Python call stacks are recorded); compare components within and between the methods
of one run, not with unprofiled throughput.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from chimera_vllm.bench.methods import Method
from chimera_vllm.bench.report import run_info, write_result_files
from chimera_vllm.vllm.engine import close_llm, generate, make_llm, warm_up

# (label, depth, pattern on the trace event's name): vLLM's V1 model runner and the Chimera draft.
COMPONENTS: tuple[tuple[str, int, str], ...] = (
    ("engine step", 0, r"gpu_model_runner\.py\(\d+\): (execute_model|sample_tokens)$"),
    ("target forward", 1, r"gpu_model_runner\.py\(\d+\): _model_forward$"),
    ("linear layers", 2, r"^(_C::onednn_mm|_C::weight_packed_linear|aten::(linear|addmm|mm|matmul))$"),
    ("attention", 2, r"^vllm::unified_attention(_with_output)?$"),
    ("KV-cache writes", 2, r"^vllm::unified_kv_cache_update$"),
    ("target LM head", 1, r"model_executor/models/(?!medusa\.py)\w+\.py\(\d+\): compute_logits$"),
    ("sampling / verification", 1, r"gpu_model_runner\.py\(\d+\): _sample$"),
    ("temperature, top-k/p (verification)", 2, r"rejection_sampler\.py\(\d+\): apply_sampling_constraints$"),
    ("rejection sampling", 2, r"rejection_sampler\.py\(\d+\): rejection_sample$"),
    ("recovered tokens", 3, r"(rejection_sampler|recovered_tokens)\.py\(\d+\): sample_recovered_tokens$"),
    ("draft proposal", 1, r"gpu_model_runner\.py\(\d+\): propose_draft_token_ids$"),
    ("write context (Chimera)", 2, r"chimera_vllm/vllm/proposer\.py\(\d+\): _write_context$"),
    ("prompt lookup (Chimera)", 2, r"chimera_vllm/vllm/proposer\.py\(\d+\): _lookup$"),
    ("draft model forward", 2, r"^nn\.Module: ChimeraDraftForVLLM_0$"),
    ("trigram encoder", 3, r"^nn\.Module: TrigramEncoder_0$|chimera_vllm/vllm/cpu_gemm\.py\(\d+\): trigram$"),
    ("encoder layer", 3, r"^nn\.Module: ChimeraEncoderLayer_0$"),
    ("residual heads", 3, r"^nn\.Module: ResidualHeads_0$|chimera_vllm/vllm/cpu_gemm\.py\(\d+\): residual_head$"),
    ("draft LM head + arg-max", 2, r"chimera_vllm/vllm/model\.py\(\d+\): greedy_tokens$"),
)


@dataclass
class StepProfile:
    """Milliseconds per engine step by component label, over ``steps`` target forward passes."""

    steps: int
    ms_per_step: dict[str, float]


Span = tuple[float, float]


def _outermost_spans(events: list[dict], pattern: re.Pattern) -> list[Span]:
    """(start, end) of the matching events not inside another matching event, in time order."""
    spans: list[Span] = []
    for e in sorted((e for e in events if pattern.search(e["name"])), key=lambda e: e["ts"]):
        if not spans or e["ts"] >= spans[-1][1]:
            spans.append((e["ts"], e["ts"] + e["dur"]))
    return spans


def _inside(spans: list[Span], parents: list[Span]) -> list[Span]:
    """The spans that lie within one of parents (time-ordered, not overlapping)."""
    starts = [start for start, _ in parents]
    kept = []
    for start, end in spans:
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and end <= parents[i][1]:
            kept.append((start, end))
    return kept


def summarize(events: list[dict]) -> StepProfile:
    """Per-step time by component from a Chrome trace's complete ("X") events."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    found: dict[str, list[Span]] = {}
    path: list[str] = []  # the labels of the current component's ancestors, by depth
    for label, depth, pattern in COMPONENTS:
        del path[depth:]
        spans = _outermost_spans(complete, re.compile(pattern))
        found[label] = _inside(spans, found[path[-1]]) if path else spans
        path.append(label)
    steps = len(found["target forward"])  # one target forward per engine step
    if steps == 0:
        raise ValueError("the trace holds no target forward pass (was the profiler running during generate?)")
    ms_per_step = {
        label: sum(end - start for start, end in spans) / 1e3 / steps for label, spans in found.items() if spans
    }
    return StepProfile(steps, ms_per_step)


def read_trace(trace_dir: str | Path) -> list[dict]:
    """The events of the one worker trace vLLM wrote under trace_dir (``*.pt.trace.json[.gz]``)."""
    paths = sorted(Path(trace_dir).glob("*.pt.trace.json*"))
    if len(paths) != 1:
        raise FileNotFoundError(f"expected one *.pt.trace.json[.gz] in {trace_dir}, found {len(paths)}")
    opener = gzip.open if paths[0].suffix == ".gz" else open
    with opener(paths[0], "rt") as f:
        return json.load(f)["traceEvents"]


def markdown_table(profiles: dict[str, StepProfile]) -> str:
    """One column per method: ms per step by component (indented by depth), and the steps counted."""
    methods = list(profiles)
    lines = ["| component | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for label, depth, _ in COMPONENTS:
        cells = [profiles[m].ms_per_step.get(label) for m in methods]
        if any(c is not None for c in cells):
            name = "&nbsp;&nbsp;" * depth + label
            lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines.append("| target forward passes | " + " | ".join(str(profiles[m].steps) for m in methods) + " |")
    return "\n".join(lines)


def profile_engine(
    target: str,
    method: Method,
    drafts: dict[str, str | None],
    prompts: list[list[int]],
    trace_dir: Path,
    dtype: str = "bfloat16",
    batch_size: int = 1,
    max_new_tokens: int = 128,
    stop_token_ids: set[int] | None = None,
    steps: int = 48,
    temperature: float = 0.0,
    **engine_args,
) -> StepProfile:
    """Generation for prompts in one engine of this method, profiling ``steps`` engine steps
    after the first four (a trace holds ~0.3 MB per step; vLLM's summary table of a long one takes
    minutes)."""
    trace_dir.mkdir(parents=True, exist_ok=False)  # one trace per directory: read_trace finds it
    profiler = {
        "profiler": "torch",
        "torch_profiler_dir": str(trace_dir.resolve()),
        "ignore_frontend": True,
        "torch_profiler_dump_cuda_time_total": False,  # a second summary table, of device time
        "delay_iterations": 4,
        "max_iterations": steps,
    }
    llm = make_llm(
        target, method.spec(drafts), dtype=dtype, max_num_seqs=batch_size, profiler_config=profiler, **engine_args
    )
    try:
        warm_up(llm, prompts[0])
        llm.start_profile()
        generate(
            llm, prompts, max_new_tokens, temperature, stop_token_ids=stop_token_ids, num_speculative_tokens=method.k
        )
        llm.stop_profile()
    finally:
        close_llm(llm)
    return summarize(read_trace(trace_dir))


def write_report(profiles: dict[str, StepProfile], out: Path, command: str, extra: dict) -> None:
    """out.json (every component per method, with the run's machine and versions) and out.md."""
    info = {**run_info(command), **extra}
    results = {"profiles": {m: asdict(p) for m, p in profiles.items()}}
    write_result_files(out, "Milliseconds per engine step", info, results, markdown_table(profiles))
