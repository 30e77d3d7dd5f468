"""What every benchmark report shares: medians over rounds, markdown cells, and the run's header
(date, machine, versions, command) written beside the results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path

from chimera_vllm.vllm.engine import openmp_runtime


def values_of(rows: list, name: str) -> list[float]:
    """The rows' values of a field, where set (a bench Row or a serving row)."""
    return [getattr(r, name) for r in rows if getattr(r, name) is not None]


def median_of(rows: list, name: str) -> float | None:
    values = values_of(rows, name)
    return statistics.median(values) if values else None


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def ratio_cell(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def speedup_cell(speedup: float | None, speedup_range: tuple[float, float] | None, suffix: str = "") -> str:
    """A speedup, with its lowest and highest round after it when several rounds measured it."""
    cell = ratio_cell(speedup, suffix)
    return cell if speedup_range is None else f"{cell} ({speedup_range[0]:.2f}-{speedup_range[1]:.2f})"


# The instruction sets that decide this project's CPU speeds: bf16 matmuls are native with
# avx512_bf16 or AMX and emulated (slower than float32) with AVX2 alone.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """'<model name>, <the CPU_FEATURES it has>' from /proc/cpuinfo (platform.processor() elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "?"
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    features = " ".join(f for f in CPU_FEATURES if f in flags) or "none of " + "/".join(CPU_FEATURES)
    return f"{fields.get('model name', '?')}, {features}"


def run_info(command: str) -> dict:
    """When, where and with what a benchmark ran: the header of every report. The command carries
    the vLLM CPU backend's settings in effect (VLLM_CPU_*: threads, cores, KV cache), which set its speed,
    and on a CPU the OpenMP runtime its engines ran on."""
    import torch
    import vllm

    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")]
    openmp = {} if torch.cuda.is_available() else {"openmp": openmp_runtime()}
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {cpu_description()}, {os.cpu_count()} CPUs",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "command": " ".join([*settings, command]),
        **openmp,
    }


def write_result_files(out: Path, title: str, info: dict, results: dict, body: str) -> None:
    """out.json ({**info, **results}) and out.md (title, info as a list, then body): every report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**info, **results}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    out.with_suffix(".md").write_text(f"# {title}\n\n{header}\n\n{body}\n")
