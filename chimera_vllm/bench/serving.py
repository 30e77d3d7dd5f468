"""Latency of vLLM's OpenAI-compatible server under load, with and without speculation.

One server per method on 127.0.0.1; for each load, vLLM's own serving client (the one
``vllm bench serve`` runs, :mod:`vllm.benchmarks.serve`) sends the prompts, streams the
answers and measures time to first token (TTFT), time per output token after the first
(TPOT) and end-to-end latency (E2EL). A load is either a concurrency level (that many
requests in flight, the next one sent when one finishes) or a request rate (Poisson
arrivals, no limit in flight). Every load is bounded: at most ``num_prompts`` requests and
``timeout_s`` seconds. Ratios compare each method with no speculation at the same load. With
``rounds`` > 1 every server runs once a round, methods alternating, each ratio against its own
round's no speculation, and the report gives each method and load its medians: on a machine whose
speed drifts between servers minutes apart, one round can put a method anywhere in a wide range.
Used by ``chimera-vllm bench-serving``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

from chimera_vllm.bench.methods import Method
from chimera_vllm.bench.report import markdown, median_of, ratio_cell, speedup_cell, values_of
from chimera_vllm.data.prompts import read_prompts
from chimera_vllm.vllm.server import server_command, server_environment

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Load:
    """Most requests in flight (None: no limit) and the arrival rate in requests/s (inf: all at once)."""

    concurrency: int | None = None
    request_rate: float = math.inf

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency}: must be at least 1")
        if not self.request_rate > 0:
            raise ValueError(f"request rate {self.request_rate}: must be above 0 requests/s")
        if self.concurrency is None and self.request_rate == math.inf:
            raise ValueError("a load needs a concurrency limit or a finite request rate")

    def __str__(self) -> str:
        if self.request_rate == math.inf:
            return f"{self.concurrency} in flight"
        rate = f"{self.request_rate:g} req/s"
        return rate if self.concurrency is None else f"{rate}, ≤{self.concurrency} in flight"


@dataclass
class ServingRow:
    method: str
    load: str
    concurrency: int | None
    request_rate: float | None  # None: all at once
    requests: int
    completed: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    mean_accepted_length: float
    ttft_ms: dict[str, float]  # "mean", "p50", "p90", "p99"
    tpot_ms: dict[str, float]
    e2el_ms: dict[str, float]
    speedup: float | None = None  # output tokens/s over no speculation's at the same load
    tpot_ratio: float | None = None  # median TPOT of no speculation / this one's (>1: faster)
    round: int = 0  # the pass of run(rounds=...) that measured it
    speedup_range: tuple[float, float] | None = None  # a median row's lowest and highest round

    @classmethod
    def from_vllm(cls, method: Method, load: Load, result: dict, round: int = 0) -> ServingRow:
        """One row from the result dict of vllm.benchmarks.serve."""

        def stats(metric: str) -> dict[str, float]:
            keys = {"mean": f"mean_{metric}_ms", **{f"p{p}": f"p{p}_{metric}_ms" for p in PERCENTILES}}
            return {name: float(result[key]) for name, key in keys.items()}

        return cls(
            method=str(method),
            load=str(load),
            concurrency=load.concurrency,
            request_rate=None if load.request_rate == math.inf else load.request_rate,
            requests=int(result["num_prompts"]),
            completed=int(result["completed"]),
            duration_s=float(result["duration"]),
            output_tokens_per_s=float(result["output_throughput"]),
            requests_per_s=float(result["request_throughput"]),
            mean_accepted_length=float(result.get("spec_decode_acceptance_length", 1.0)),
            ttft_ms=stats("ttft"),
            tpot_ms=stats("tpot"),
            e2el_ms=stats("e2el"),
            round=round,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    command: list[str], timeout_s: float = 600, log_path: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run an OpenAI-compatible server command on 127.0.0.1 (host and a free port appended), its
    log in log_path (default: a temporary file).

    Yields its base URL and process once /health answers; stops it with SIGTERM on exit. On a
    CPU the server's engine runs on Intel's OpenMP (:func:`~chimera_vllm.vllm.server.server_environment`).
    Fails with the server's last log lines if it exits or is not healthy within timeout_s.
    """
    port = free_port()
    env = server_environment()
    with open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base, proc, log, timeout_s)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def healthy(base: str, timeout_s: float = 10) -> bool:
    """Whether the server at base answers its /health with 200."""
    try:
        return httpx.get(f"{base}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(base: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{log.read()[-4000:]}")
        if healthy(base, timeout_s=2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the vLLM server at {base} was not healthy within {timeout_s:g} s")
        time.sleep(1)


def server_args(dtype: str, max_model_len: int, extra: list[str] = ()) -> list[str]:
    """The server's arguments for a benchmark: dtype and context length, then extra (the platform's
    engine defaults are added by vllm.server.server_command where extra does not set them)."""
    return ["--dtype", dtype, "--max-model-len", str(max_model_len), *extra]


def measure_load(
    base_url: str,
    model: str,
    prompts_path: str | Path,
    load: Load,
    num_prompts: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    timeout_s: float = 600,
    seed: int = 0,
    tokenizer: str | None = None,
) -> dict:
    """vLLM's serving benchmark client against a running server: its result dict.

    The prompts (any format read_prompts accepts) go in file order; chat prompts are
    rendered with the server tokenizer's chat template by the client. Raises TimeoutError
    when the load takes longer than timeout_s. tokenizer: where the client finds the served
    model's tokenizer (to count tokens), when the server's model name is not a path or hub name."""
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    prompts = read_prompts(prompts_path)
    if len({p.chat for p in prompts}) > 1:
        raise ValueError(f"{prompts_path}: mixes chat and raw-text prompts; the serving client renders one kind")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
        argv = [
            "--backend", "openai-chat" if prompts[0].chat else "openai",
            "--endpoint", "/v1/chat/completions" if prompts[0].chat else "/v1/completions",
            "--base-url", base_url,
            "--model", model,
            "--dataset-name", "custom",
            "--dataset-path", str(dataset),
            "--disable-shuffle",
            "--skip-chat-template",  # the chat endpoint applies the template on the server
            "--num-prompts", str(min(num_prompts, len(prompts))),
            "--custom-output-len", str(max_new_tokens),
            "--temperature", str(temperature),
            "--request-rate", str(load.request_rate),
            "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--num-warmups", "1",
            "--seed", str(seed),
            "--disable-tqdm",
        ]  # fmt: skip
        if tokenizer is not None:
            argv += ["--tokenizer", tokenizer]
        if load.concurrency is not None:
            argv += ["--max-concurrency", str(load.concurrency)]
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(argv)
        try:  # the client prints its arguments and its own report: this module's table replaces both
            with contextlib.redirect_stdout(io.StringIO()):
                result = asyncio.run(asyncio.wait_for(main_async(args), timeout_s))
        except TimeoutError as e:
            raise TimeoutError(f"load {load} took longer than {timeout_s:g} s") from e
    errors = [e for e in result.get("errors", []) if e]
    if errors:
        total = len(result["errors"])
        print(f"load {load}: {len(errors)} of {total} requests failed, the first with: {errors[0]}", file=sys.stderr)
    return result


def run(
    target: str,
    drafts: dict[str, str | None],
    methods: list[Method],
    loads: list[Load],
    prompts_path: str | Path,
    num_prompts: int,
    max_new_tokens: int,
    server_args: list[str],
    temperature: float = 0.0,
    timeout_s: float = 600,
    rounds: int = 1,
) -> list[ServingRow]:
    """One server per method (no speculation first: every ratio needs it), every load against each;
    rounds: all of that so many times, round after round (median_rows sums them up)."""
    from tqdm.auto import tqdm

    if rounds < 1:
        raise ValueError(f"--rounds must be 1 or more, got {rounds}")
    if Method("none") not in methods:
        methods = [Method("none"), *methods]
    if not loads:
        raise ValueError("no loads: give concurrency levels or request rates")
    if any(m.name == "hf" for m in methods):
        raise ValueError(
            "method hf: transformers' generate is not a server; "
            "use none, ngram:K, suffix[:K], chimera:K, chimera+ngram:K[:D], medusa:K or eagle3:K"
        )
    rows: list[ServingRow] = []
    bar = tqdm(total=rounds * len(methods) * len(loads), desc="loads", unit="load")
    for round_, method in ((i, m) for i in range(rounds) for m in methods):
        with serve(server_command(target, method.spec(drafts), server_args)) as (base, _):
            for load in loads:
                bar.set_postfix_str(f"{method}, {load}" + (f", round {round_ + 1}" if rounds > 1 else ""))
                result = measure_load(
                    base, target, prompts_path, load, num_prompts, max_new_tokens, temperature, timeout_s
                )
                rows.append(ServingRow.from_vllm(method, load, result, round_))
                bar.update()
    bar.close()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[ServingRow]) -> None:
    """Each row's ratios against no speculation at the same load in the same round."""
    base = {(r.round, r.load): r for r in rows if r.method == "none"}
    for r in rows:
        b = base.get((r.round, r.load))
        if b is not None:
            r.speedup = r.output_tokens_per_s / b.output_tokens_per_s
            r.tpot_ratio = b.tpot_ms["p50"] / r.tpot_ms["p50"]


def median_rows(rows: list[ServingRow]) -> list[ServingRow]:
    """One row per method and load: the first round's, with the median over the rounds of every
    rate, latency percentile and ratio, completions summed, and speedup_range the lowest and
    highest per-round speedup. A setting measured once keeps its row."""
    groups: dict[tuple[str, str], list[ServingRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.load), []).append(r)
    return [group[0] if len(group) == 1 else _median_row(group) for group in groups.values()]


def _median_row(group: list[ServingRow]) -> ServingRow:
    def median_stats(name: str) -> dict[str, float]:
        return {key: statistics.median(getattr(r, name)[key] for r in group) for key in getattr(group[0], name)}

    speedups = values_of(group, "speedup")
    return replace(
        group[0],
        requests=sum(r.requests for r in group),
        completed=sum(r.completed for r in group),
        speedup_range=(min(speedups), max(speedups)) if speedups else None,
        **{name: median_of(group, name) for name in _MEDIAN_FIELDS},
        **{f"{metric}_ms": median_stats(f"{metric}_ms") for metric in METRICS},
    )


_MEDIAN_FIELDS = (
    "duration_s", "output_tokens_per_s", "requests_per_s", "mean_accepted_length", "speedup", "tpot_ratio",
)  # fmt: skip


def markdown_table(rows: list[ServingRow]) -> str:
    """The report's table; with several rounds, each method and load's medians (speedup: median
    (lowest-highest)) and the requests completed over all rounds."""
    rounds = 1 + max((r.round for r in rows), default=0)
    shown = median_rows(rows) if rounds > 1 else rows
    header = ["method", "load", "done", "tok/s", "req/s", "τ", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms"]
    header += ["E2EL p50 / p99 s", "speedup", "TPOT gain"]
    cells = [
        [r.method, r.load, f"{r.completed}/{r.requests}", f"{r.output_tokens_per_s:.1f}", f"{r.requests_per_s:.2f}"]
        + [f"{r.mean_accepted_length:.2f}", _p50_p99(r.ttft_ms, "{:.0f}"), _p50_p99(r.tpot_ms, "{:.1f}")]
        + [_p50_p99(r.e2el_ms, "{:.2f}", 1e-3), speedup_cell(r.speedup, r.speedup_range, "x")]
        + [ratio_cell(r.tpot_ratio, "x")]
        for r in shown
    ]
    table = markdown(header, cells)
    if rounds == 1:
        return table
    note = f"Medians over {rounds} rounds (servers alternated round by round; each ratio against its round's)"
    return f"{note}:\n\n{table}"


def _p50_p99(stats: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    return f"{fmt.format(stats['p50'] * scale)} / {fmt.format(stats['p99'] * scale)}"


def plot(rows: list[ServingRow], path: Path) -> None:
    """Median (bar) and p99 (whisker) TTFT, TPOT and E2EL per load, one group of bars per method
    (over several rounds, the medians of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = median_rows(rows)
    loads = list(dict.fromkeys(r.load for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        for i, method in enumerate(methods):
            by_load = {r.load: getattr(r, f"{metric}_ms") for r in rows if r.method == method}
            xs = [j + i * width for j, load in enumerate(loads) if load in by_load]
            p50 = [by_load[load]["p50"] for load in loads if load in by_load]
            p99 = [by_load[load]["p99"] for load in loads if load in by_load]
            ax.bar(xs, p50, width, label=method, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]], capsize=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], loads, rotation=20, fontsize=8)
        ax.set(ylabel=f"{metric.upper()} ms (bar p50, whisker p99)", title=metric.upper())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[ServingRow], out: Path, command: str, extra: dict) -> None:
    """out.json (every row, machine and versions), out.md (the table) and out.png."""
    from chimera_vllm.bench.report import run_info, write_result_files

    info = {**run_info(command), **extra}
    body = f"{markdown_table(rows)}\n\n![]({out.name}.png)"
    write_result_files(out, "Serving latency under load", info, {"rows": [asdict(r) for r in rows]}, body)
    plot(rows, out.with_suffix(".png"))
