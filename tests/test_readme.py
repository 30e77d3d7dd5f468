"""Every shell command in the README's code blocks runs as written after the README's set-up:
each chimera-vllm command parses (serve as a dry run, doctor for real), each `vllm serve` uses only
flags vLLM's own command knows, and the make targets exist."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chimera_vllm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The README's bash blocks, one command per entry (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_each_kind():
    firsts = {shlex.split(c)[0] for c in COMMANDS}
    assert {"make", "pip", "chimera-vllm", "vllm"} <= firsts, firsts
    assert not firsts - {"make", "pip", "chimera-vllm", "vllm"}, f"a command kind this test does not check: {firsts}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("chimera-vllm ")])
def test_a_chimera_vllm_command_parses(command, capsys):
    argv = shlex.split(command)[1:]
    if argv[0] == "serve":
        assert main([*argv, "--dry-run"]) == 0
        assert "chimera_vllm.vllm.server serve" in capsys.readouterr().out
    elif argv[0] == "doctor":
        assert main(argv) == 0
        assert "changes to vLLM internals" in capsys.readouterr().out
    else:
        args, extra = build_parser().parse_known_args(argv)
        assert not extra, f"{command}: options {extra} are not {argv[0]}'s"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("vllm ")])
def test_a_vllm_command_uses_flags_vllm_knows(command):
    vllm = VENV_BIN / "vllm"
    assert vllm.exists(), "the set-up installs vLLM's command"
    run = subprocess.run([str(vllm), "serve", "--help=all"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    flags = [a.split("=")[0] for a in shlex.split(command) if a.startswith("--")]
    for flag in flags:
        assert re.search(rf"(^|\s|,){re.escape(flag)}([\s,=]|$)", run.stdout, re.M), f"vllm serve has no {flag}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_a_make_target_exists(command):
    make = shutil.which("make")
    assert make is not None
    run = subprocess.run([make, "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("pip ")])
def test_a_pip_command_is_one_pip_accepts(command):
    argv = shlex.split(command)[1:]
    assert argv[0] in ("install", "wheel") and argv[-1] == "."
    run = subprocess.run([sys.executable, "-m", "pip", argv[0], "--help"], capture_output=True, text=True)
    assert run.returncode == 0
