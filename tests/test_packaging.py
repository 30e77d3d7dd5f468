"""A non-editable install carries everything the commands read: the shipped drafts, the prompt
sets and the kernels, found inside the installed package with no checkout beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as `pip install .` lays it out: the wheel built from a copy of the tracked
    tree (no build/ left over from an editable install), unpacked into a site folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    source = tmp / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True)
    (wheel,) = tmp.glob("chimera_vllm-*.whl")
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def run_installed(site: Path, tmp_path: Path, code: str) -> str:
    """Python code run from an empty folder with the unpacked wheel first on the path."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_wheel_holds_the_drafts_the_prompt_sets_and_the_kernels(installed):
    package = installed / "chimera_vllm"
    assert (package / "drafts" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert (package / "data" / "mt_bench_questions.jsonl").is_file() and (package / "data" / "SOURCES.md").is_file()
    assert (package / "kernels" / "trigram.py").is_file()
    assert not (package / "model.py").exists() and not (package / "vllm_plugin.py").exists()  # the old layout
    (entry_points,) = installed.glob("chimera_vllm-*.dist-info/entry_points.txt")
    assert "chimera = chimera_vllm.vllm.plugin:register" in entry_points.read_text()


def test_the_installed_package_finds_its_data_without_a_checkout(installed, tmp_path):
    printed = run_installed(
        installed,
        tmp_path,
        "import chimera_vllm, chimera_vllm.data as d, chimera_vllm.drafts as s\n"
        "print(chimera_vllm.__file__); print(d.MT_BENCH.is_file()); print(s.resolve_draft('smollm2-135m-instruct'))\n"
        "from chimera_vllm.cli import build_parser; build_parser().parse_args(['demo', '--num-prompts', '2'])",
    )
    where, has_prompts, draft = printed.split()
    assert Path(where).is_relative_to(installed) and has_prompts == "True"
    assert Path(draft).is_relative_to(installed)
