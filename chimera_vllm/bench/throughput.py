"""Throughput of vLLM offline batch inference with and without speculation.

One engine per (dtype, method, batch size): ``max_num_seqs`` is the batch size, so
vLLM's scheduler keeps that many requests running, as a server under load would.
Every number in a report comes from one run on one machine, and every speedup is a
ratio to the no-speculation engine of the same dtype, batch size and temperature (and
round: with ``rounds`` > 1 every engine runs once a round, methods alternating, and
the report gives each setting's median and the range of its per-round speedups, since
a small machine's speed drifts more between engines minutes apart than within a round).
Used by ``chimera-vllm bench`` and the demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from chimera_vllm.bench.methods import ANY_BATCH, HYBRID, Method
from chimera_vllm.bench.report import (
    markdown,
    median_of,
    ratio_cell,
    run_info,
    speedup_cell,
    values_of,
    write_result_files,
)
from chimera_vllm.vllm.engine import close_llm, generate, make_llm, warm_up


def tuned_schedule(
    rows: list[Row], dtype: str, hybrid: Method | None = None
) -> tuple[tuple[int, int, int], ...] | None:
    """vLLM's batch-size schedule from greedy measurements: at each measured batch size the K of the
    fastest Chimera row, or 0 where no-speculation was faster; each K covers the batch sizes from
    just above the previous measured size up to its own (the last one up to any size).
    None when speculation lost everywhere.

    hybrid (a chimera+ngram:K:D method): its own schedule, at each batch size the fastest of the
    hybrid itself (K), a Chimera row chimera:k with k <= D (scheduled as k, the hybrid then drafts k
    tokens, the lookup's where the text repeats and the draft model's elsewhere: measured as the
    Chimera row, where prompt lookup's longer drafts cost more rows than they gain) and no
    speculation (0)."""
    measured = sorted({r.batch_size for r in rows if (r.method, r.dtype, r.temperature) == ("none", dtype, 0)})

    def schedulable(method: str) -> bool:
        if hybrid is not None and method == str(hybrid):
            return True
        name, _, k = method.partition(":")  # chimera:K rows; not chimera:auto or chimera:K@N
        return name == "chimera" and k.isdigit() and (hybrid is None or int(k) <= (hybrid.draft_k or hybrid.k))

    entries, first = [], 1
    for i, b in enumerate(measured):
        candidates = [
            r for r in rows if (r.dtype, r.batch_size, r.temperature) == (dtype, b, 0) and schedulable(r.method)
        ]
        best = max(candidates, key=lambda r: r.output_tokens_per_s, default=None)
        k = Method.parse(best.method).k if best is not None and (best.speedup or 0) > 1 else 0
        last = b if i + 1 < len(measured) else ANY_BATCH
        entries.append((first, last, k))
        first = b + 1
    return tuple(entries) if any(k for *_, k in entries) else None


@dataclass
class Row:
    dtype: str
    method: str
    batch_size: int
    temperature: float
    num_prompts: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    ms_per_output_token: float  # per request: wall time x batch size / output tokens
    mean_accepted_length: float
    acceptance_by_position: list[float]
    speedup: float | None = None  # over "none" at the same dtype, batch size and temperature
    speedup_over_tau: float | None = None
    outputs_identical: bool | None = None  # greedy only: token for token equal to "none"
    match_rate: float | None = None  # greedy only: share of outputs equal to "none"'s
    only_near_ties: bool | None = None  # every divergence starts at a near-tie (chimera_vllm/compare.py)
    round: int = 0  # the pass of run(rounds=...) that measured it
    speedup_range: tuple[float, float] | None = None  # a median row's lowest and highest round
    outputs: list[list[int]] = field(default_factory=list, repr=False)


def run_engine(
    target: str,
    method: Method,
    drafts: dict[str, str | None],
    dtype: str,
    batch_size: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperatures: list[float],
    stop_token_ids: set[int],
    progress: bool = False,
    **engine_args,
) -> list[Row]:
    if method.name == "hf":
        return [
            hf_generate_row(target, dtype, prompts, max_new_tokens, stop_token_ids)
            for temperature in temperatures
            if temperature == 0
        ]
    llm = make_llm(target, method.spec(drafts), dtype=dtype, max_num_seqs=batch_size, **engine_args)
    try:
        warm_up(llm, prompts[0])
        rows = []
        for temperature in temperatures:
            outputs, stats = generate(
                llm, prompts, max_new_tokens, temperature, 0, stop_token_ids, method.k, progress=progress
            )
            s = stats.to_dict()
            rows.append(
                Row(
                    dtype=dtype,
                    method=str(method),
                    batch_size=batch_size,
                    temperature=temperature,
                    num_prompts=len(prompts),
                    output_tokens=stats.output_tokens,
                    wall_s=stats.wall_s,
                    output_tokens_per_s=s["output_tokens_per_s"],
                    ms_per_output_token=1e3 * stats.wall_s * min(batch_size, len(prompts)) / stats.output_tokens,
                    mean_accepted_length=s["mean_accepted_length"],
                    acceptance_by_position=s["acceptance_by_position"],
                    outputs=outputs,
                )
            )
        return rows
    finally:
        close_llm(llm)


def hf_generate_row(
    target: str, dtype: str, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: set[int]
) -> Row:
    """transformers' greedy ``generate`` at batch 1, over every prompt in turn."""
    import time

    import torch

    from chimera_vllm.reference.target import load_target

    model = load_target(target, dtype)
    eos = sorted(stop_token_ids)
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)  # warm-up
    outputs, start = [], time.perf_counter()
    for prompt in tqdm(prompts, desc="transformers generate", leave=False):
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
        outputs.append(out[0, len(prompt) :].tolist())
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return Row(
        dtype, "hf", 1, 0.0, len(prompts), tokens, wall, tokens / wall, 1e3 * wall / tokens, 1.0, [], outputs=outputs
    )


def add_ratios(rows: list[Row]) -> None:
    """Speedups, speedup/tau and output identity against the no-speculation row of each setting
    and round (for transformers' generate: vLLM's no-speculation row at the smallest batch size)."""
    base = {(r.dtype, r.batch_size, r.temperature, r.round): r for r in rows if r.method == "none"}
    smallest = min((r.batch_size for r in rows if r.method == "none"), default=1)
    for r in rows:
        b = base.get((r.dtype, smallest if r.method == "hf" else r.batch_size, r.temperature, r.round))
        if b is None:
            continue
        r.speedup = r.output_tokens_per_s / b.output_tokens_per_s
        r.speedup_over_tau = r.speedup / r.mean_accepted_length
        if r.temperature == 0:
            r.outputs_identical = r.outputs == b.outputs


def run(
    target: str,
    drafts: dict[str, str | None],
    prompts: list[list[int]],
    methods: list[Method],
    batch_sizes: list[int],
    dtypes: list[str],
    temperatures: list[float],
    max_new_tokens: int,
    stop_token_ids: set[int],
    progress: bool = False,
    tune_schedule: bool = False,
    rounds: int = 1,
    **engine_args,
) -> list[Row]:
    """One engine per (dtype, method, batch size) and round; progress shows each engine's requests too.

    tune_schedule: then one more Chimera engine per batch size with vLLM's batch-size schedule
    built from the measured rows (method "chimera:auto", see tuned_schedule), and one per
    chimera+ngram method with its own ("chimera+ngram:K:D:auto"). Greedy rows whose
    outputs differ from no-spec's get their match rate and near-tie check (check_divergences).
    rounds: every engine that many times, round after round (median_rows sums them up)."""
    if rounds < 1:
        raise ValueError(f"--rounds must be 1 or more, got {rounds}")
    if rounds > 1 and tune_schedule:
        raise ValueError(
            f"--rounds {rounds} alternates fixed methods; --tune-schedule's engines run after them, "
            "not alternated: give the schedule as a method instead (chimera:2@4)"
        )
    if Method("none") not in methods:
        methods = [Method("none"), *methods]  # every ratio needs its baseline
    # transformers' generate runs at batch 1 only: once per dtype
    configs = [(d, m, b) for d in dtypes for b in batch_sizes for m in methods if m.name != "hf" or b == batch_sizes[0]]

    def measure(dtype: str, method: Method, batch_size: int) -> list[Row]:
        return run_engine(
            target,
            method,
            drafts,
            dtype,
            batch_size,
            prompts,
            max_new_tokens,
            temperatures,
            stop_token_ids,
            progress,
            **engine_args,
        )

    rows: list[Row] = []
    passes = [(i, *config) for i in range(rounds) for config in configs]
    for i, dtype, method, batch_size in tqdm(passes, desc="engines", unit="engine"):
        rows += [replace(row, round=i) for row in measure(dtype, method, batch_size)]
    add_ratios(rows)
    if tune_schedule:
        for dtype in dtypes:
            for auto in tuned_methods(rows, dtype, methods):
                rows += [row for batch_size in batch_sizes for row in measure(dtype, auto, batch_size)]
        add_ratios(rows)
    if any(r.outputs_identical is False and r.round == 0 for r in rows):
        from chimera_vllm.reference.target import load_target

        check_divergences([r for r in rows if r.round == 0], load_target(target, "float32"), prompts)
    return rows


def tuned_methods(rows: list[Row], dtype: str, methods: list[Method]) -> list[Method]:
    """The schedules tuned from the measured rows: "chimera:auto", and "chimera+ngram:K:D:auto" for
    each chimera+ngram method (tuned_schedule); none where no schedule could be built."""
    tuned = [Method("chimera", max(k for *_, k in s), s) for s in [tuned_schedule(rows, dtype)] if s is not None]
    for hybrid in (m for m in methods if m.name == HYBRID):
        schedule = tuned_schedule(rows, dtype, hybrid)
        if schedule is not None:
            tuned.append(replace(hybrid, schedule=schedule))
    return tuned


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (dtype, method, batch size, temperature): the first round's, with the median over
    the rounds of its throughput, τ and per-round ratios, and speedup_range the lowest and highest
    per-round speedup. A setting measured once keeps its row."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.dtype, r.method, r.batch_size, r.temperature), []).append(r)
    medians = []
    for group in groups.values():
        if len(group) == 1:
            medians.append(group[0])
            continue
        speedups = values_of(group, "speedup")
        medians.append(
            replace(
                group[0],
                speedup_range=(min(speedups), max(speedups)) if speedups else None,
                **{name: median_of(group, name) for name in MEDIAN_FIELDS},
            )
        )
    return medians


MEDIAN_FIELDS = ("output_tokens_per_s", "ms_per_output_token", "mean_accepted_length", "speedup", "speedup_over_tau")


def check_divergences(rows: list[Row], target, prompts: list[list[int]]) -> None:
    """For greedy rows whose outputs differ from "none"'s (bf16 arithmetic depends on batch shape):
    the match rate, and whether every divergence starts at a near-tie of the float32 target."""
    from chimera_vllm.evaluation.compare import compare_outputs

    base = {(r.dtype, r.batch_size): r for r in rows if r.method == "none" and r.temperature == 0}
    for r in rows:
        b = base.get((r.dtype, r.batch_size))
        if r.temperature != 0 or b is None or r is b:
            continue
        comparison = compare_outputs(target, prompts, b.outputs, r.outputs)
        r.match_rate, r.only_near_ties = comparison.match_rate, comparison.only_near_ties


def identity(r: Row) -> str:
    """Whether a greedy row's outputs equal no-spec's: yes, no (with the match rate when known), or -."""
    if r.outputs_identical is None:
        return "-"
    if r.outputs_identical:
        return "yes"
    return "no" if r.match_rate is None else f"no ({r.match_rate:.0%} equal)"


def markdown_table(rows: list[Row]) -> str:
    """The report's table; with several rounds, each setting's medians (speedup: median (lowest-highest))."""
    rounds = 1 + max((r.round for r in rows), default=0)
    shown = median_rows(rows) if rounds > 1 else rows
    header = "dtype method batch T tok/s ms/token τ speedup speedup/τ identical".split() + ["near-ties only"]
    cells = []
    for r in shown:
        ties = "-" if r.only_near_ties is None or r.outputs_identical else ("yes" if r.only_near_ties else "NO")
        speedup = speedup_cell(r.speedup, r.speedup_range)
        cells.append(
            [r.dtype, r.method, str(r.batch_size), f"{r.temperature:g}", f"{r.output_tokens_per_s:.1f}"]
            + [f"{r.ms_per_output_token:.1f}", f"{r.mean_accepted_length:.2f}", speedup]
            + [ratio_cell(r.speedup_over_tau), identity(r), ties]
        )
    table = markdown(header, cells)
    if rounds == 1:
        return table
    note = f"Medians over {rounds} rounds (engines alternated round by round; each speedup against its round's)"
    return f"{note}:\n\n{table}"


def plot(measured: list[Row], path: Path) -> None:
    """Throughput per method (one panel per dtype and temperature: against batch size, or bars with
    the speedup and τ where one batch size was measured; with several rounds the medians, each
    round a faint dot), and the acceptance rate by draft position of each speculative method (at
    its smallest batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = median_rows(measured)
    panels = sorted({(r.dtype, r.temperature) for r in rows})
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r.method for r in rows))}  # one per method
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4), squeeze=False)
    one_batch_size = len({r.batch_size for r in rows}) == 1
    for ax, panel in zip(axes[0], panels):
        in_panel = [r for r in rows if (r.dtype, r.temperature) == panel]
        rounds = [r for r in measured if (r.dtype, r.temperature) == panel] if any(r.round for r in measured) else []
        if one_batch_size:
            _throughput_bars(ax, in_panel, rounds, colors)
        else:
            _throughput_lines(ax, in_panel, rounds, colors)
        ax.set_title(f"{panel[0]}, T={panel[1]:g}" + (f", batch {rows[0].batch_size}" if one_batch_size else ""))
    ax = axes[0][-1]
    smallest: dict[tuple, Row] = {}
    for r in rows:
        key = (r.method, r.dtype, r.temperature)
        if r.acceptance_by_position and (key not in smallest or r.batch_size < smallest[key].batch_size):
            smallest[key] = r
    for (method, dtype, temperature), r in smallest.items():
        label = method if len(panels) == 1 else f"{method}, {dtype}, T={temperature:g}"
        positions = range(1, len(r.acceptance_by_position) + 1)
        ax.plot(positions, r.acceptance_by_position, marker="o", label=label, color=colors[method])
    ax.set(xlabel="draft position", ylabel="accepted per target step", title="acceptance by position", ylim=(0, 1))
    ax.xaxis.get_major_locator().set_params(integer=True)
    if smallest:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _throughput_lines(ax, rows: list[Row], rounds: list[Row], colors: dict[str, str]) -> None:
    """Output tokens/s against batch size, a line per method (each round a faint dot)."""
    for method, color in colors.items():
        pts = sorted((r.batch_size, r.output_tokens_per_s) for r in rows if r.method == method)
        if not pts:  # e.g. transformers' generate, greedy only, in a T > 0 panel
            continue
        ax.plot(*zip(*pts), marker="o", label=method, color=color)
        dots = [(r.batch_size, r.output_tokens_per_s) for r in rounds if r.method == method]
        if dots:
            ax.scatter(*zip(*dots), color=color, alpha=0.3, s=12)
    sizes = sorted({r.batch_size for r in rows})
    ax.set(xscale="log", xlabel="batch size (max_num_seqs)", ylabel="output tokens/s", ylim=(0, None))
    ax.set(xticks=sizes, xticklabels=[str(b) for b in sizes])
    ax.minorticks_off()
    ax.legend()


def _throughput_bars(ax, rows: list[Row], rounds: list[Row], colors: dict[str, str]) -> None:
    """Output tokens/s, a bar per method, each labelled with its speedup and τ (each round a dot)."""
    for i, r in enumerate(rows):
        ax.bar(i, r.output_tokens_per_s, color=colors[r.method])
        label = "" if r.speedup is None else f"{r.speedup:.2f}x, τ {r.mean_accepted_length:.2f}"
        ax.annotate(
            label, (i, r.output_tokens_per_s), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points"
        )
        dots = [x.output_tokens_per_s for x in rounds if x.method == r.method]
        ax.scatter([i] * len(dots), dots, color="black", alpha=0.4, s=12, zorder=3)
    ax.set(xticks=range(len(rows)), xticklabels=[r.method for r in rows], ylabel="output tokens/s")
    ax.set_ylim(0, 1.15 * max((r.output_tokens_per_s for r in rows), default=1))


def write_report(rows: list[Row], out: Path, command: str, extra: dict) -> None:
    """out.json (every row, with the run's machine and versions), out.md (the table) and out.png."""

    def as_json(rs: list[Row]) -> list[dict]:
        return [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in rs]

    results = {"rows": as_json(rows)}
    if any(r.round for r in rows):
        results["medians"] = as_json(median_rows(rows))
    body = f"{markdown_table(rows)}\n\n![]({out.name}.png)"
    write_result_files(out, "Throughput", {**run_info(command), **extra}, results, body)
    plot(rows, out.with_suffix(".png"))
