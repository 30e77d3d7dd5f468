"""The package's layers hold: a folder imports only from folders at or below its own layer.

Lower layers know nothing of the ones above them, so each can be read, tested and replaced on
its own: the draft's model knows nothing of vLLM, the vLLM integration nothing of training or
benchmarks, and only the command line sees everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import chimera_vllm

PACKAGE = Path(chimera_vllm.__file__).parent
LAYERS = (
    {"config", "environment", "data", "drafts", "kernels"},
    {"model"},
    {"reference"},
    {"vllm"},
    {"training"},
    {"evaluation"},
    {"testing"},
    {"bench"},
    {"recipe"},
    {"cli"},
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def part_of(module: str) -> str:
    """chimera_vllm.X.Y -> X."""
    return module.split(".")[1]


def imported_modules(path: Path) -> list[str]:
    """Every chimera_vllm module the file imports, at its top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "chimera_vllm":
                found += [f"chimera_vllm.{a.name}" for a in node.names]
            elif node.module.startswith("chimera_vllm."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("chimera_vllm.")]
    return found


def package_files() -> list[Path]:
    kernels = PACKAGE / "kernels"
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"]
    return files + (list(kernels.glob("*.py")) if not kernels.is_relative_to(PACKAGE) else [])


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_nothing_from_a_layer_above_its_own(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LAYER_OF, f"{own}: a folder the layers in this test do not place"
    above = [m for m in imported_modules(path) if LAYER_OF[part_of(m)] > LAYER_OF[own]]
    assert not above, f"{path.relative_to(PACKAGE)} ({own}) imports from a layer above its own: {above}"


def test_the_checker_sees_an_import_from_above(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from chimera_vllm.cli import main\n    from chimera_vllm import bench\n")
    assert imported_modules(sample) == ["chimera_vllm.cli", "chimera_vllm.bench"]
