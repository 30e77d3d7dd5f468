"""The soak itself: each server under the same mixed traffic for a set time, then its state.

A server is vLLM's OpenAI-compatible server on 127.0.0.1 (bench/serving.serve), without
speculation first and then with each draft. The traffic goes out in phases that cycle through
the concurrency levels and end each cycle with a burst (every request of the burst at once).
When the time is up the load drains, and the server's state is read: whether it still runs and
answers /health, its resident memory (the server and its engine processes) against the start's,
and the share of KV blocks in use (back to ~0 when every aborted stream freed its blocks).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from chimera_vllm.bench.serving import healthy, serve
from chimera_vllm.bench.soak.client import OUTCOMES, Outcome, send
from chimera_vllm.bench.soak.traffic import RequestSpec

LEVELS = (1, 4, 16)
"""Concurrency levels the phases cycle through; each cycle ends with a burst of twice the highest."""


@dataclass
class ServerReport:
    name: str
    speculative: bool
    requests: int = 0  # sent
    completed: int = 0
    dropped: int = 0  # streams the client closed
    refused_as_expected: int = 0
    unexpected_failures: int = 0
    server_errors: int = 0  # 5xx
    crashes: int = 0  # the server or its engine gone, or /health failing, after the load
    kv_usage_after_drain: float | None = None  # share of KV blocks in use once no request runs
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_by_phase_mb: list[float] = field(default_factory=list)  # after each phase: warm-up or a leak
    duration_s: float = 0.0
    first_failures: list[str] = field(default_factory=list)

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_start_mb

    def count(self, outcomes: list[Outcome]) -> None:
        counts = Counter(o.outcome for o in outcomes)
        self.requests = len(outcomes)
        self.completed, self.dropped, self.refused_as_expected = (
            counts["completed"],
            counts["dropped"],
            counts["refused"],
        )
        self.unexpected_failures, self.server_errors = counts["unexpected"], counts["server_error"]
        bad = [o for o in outcomes if o.outcome in OUTCOMES[3:]]
        self.first_failures = [f"request {o.index}: {o.outcome} {o.status}: {o.error}" for o in bad[:5]]


def soak_server(
    name: str,
    command: list[str],
    model: str,
    traffic: list[RequestSpec],
    duration_s: float,
    levels: tuple[int, ...] = LEVELS,
    request_timeout_s: float = 300,
    log_path: Path | None = None,
    progress: bool = True,
) -> tuple[ServerReport, list[Outcome]]:
    """Serve with command (speculative when it carries a speculative config; its log in
    log_path), send traffic for duration_s (at most all of it), and report."""
    report = ServerReport(name, speculative="--speculative-config" in command)
    with serve(command, log_path=log_path) as (base, proc):
        warm_up = httpx.post(
            f"{base}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}, timeout=120
        )
        warm_up.raise_for_status()
        report.rss_start_mb = resident_mb(proc)
        start = time.monotonic()
        outcomes = asyncio.run(
            drive(
                base, model, traffic, report.speculative, duration_s, levels, request_timeout_s, name, progress,
                after_phase=lambda: report.rss_by_phase_mb.append(round(resident_mb(proc), 1)),
            )
        )  # fmt: skip
        report.duration_s = time.monotonic() - start
        report.count(outcomes)
        alive = proc.poll() is None and healthy(base)
        report.crashes = 0 if alive else 1
        if alive:
            report.kv_usage_after_drain = kv_usage_once_drained(base)
            report.rss_end_mb = resident_mb(proc)
    return report, outcomes


async def drive(
    base: str,
    model: str,
    traffic: list[RequestSpec],
    speculative: bool,
    duration_s: float,
    levels: tuple[int, ...],
    request_timeout_s: float,
    name: str = "",
    progress: bool = True,
    after_phase: Callable[[], None] = lambda: None,
) -> list[Outcome]:
    """The phases: each level for a tenth of the time (at least 5 s), then a burst, round and round;
    after_phase is called after each."""
    from tqdm.auto import tqdm

    pending = iter(traffic)
    outcomes: list[Outcome] = []
    phase_s = max(5.0, duration_s / 10)
    end = time.monotonic() + duration_s
    bar = tqdm(total=round(duration_s), desc=f"soak {name}", unit="s", disable=not progress)
    limits = httpx.Limits(max_connections=2 * max(levels) + 8)
    async with httpx.AsyncClient(base_url=base, timeout=request_timeout_s, limits=limits) as client:

        async def worker(until: float) -> None:
            while time.monotonic() < until:
                spec = next(pending, None)
                if spec is None:
                    return
                outcomes.append(await send(client, spec, model, speculative))
                bar.set_postfix_str(f"{len(outcomes)} requests", refresh=False)

        phases = [*levels, None]  # None: the burst
        i = 0
        while time.monotonic() < end and len(outcomes) < len(traffic):
            level = phases[i % len(phases)]
            started = time.monotonic()
            if level is None:
                burst = [spec for spec in (next(pending, None) for _ in range(2 * max(levels))) if spec]
                outcomes += await asyncio.gather(*(send(client, spec, model, speculative) for spec in burst))
            else:
                until = min(end, started + phase_s)
                await asyncio.gather(*(worker(until) for _ in range(level)))
            bar.update(min(round(time.monotonic() - started), bar.total - bar.n))
            after_phase()
            i += 1
    bar.close()
    return sorted(outcomes, key=lambda o: o.index)


def resident_mb(proc) -> float:
    """Resident memory of a server and every process under it (its engine), in MiB."""
    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def kv_usage_once_drained(base: str, timeout_s: float = 60) -> float | None:
    """vLLM's KV-cache usage gauge once no request runs or waits (None: it never drained)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        in_flight = gauge(metrics, "vllm:num_requests_running") + gauge(metrics, "vllm:num_requests_waiting")
        if in_flight == 0:
            return gauge(metrics, "vllm:kv_cache_usage_perc")
        time.sleep(1)
    return None


def gauge(metrics: str, name: str) -> float:
    """A metric's value in Prometheus text, summed over its label sets (0 when absent)."""
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + "{"))
