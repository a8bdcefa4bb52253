"""The code standards are part of the test suite: ruff (lint and format) and mypy --strict."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is a dev dependency")
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_on_scheduler() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


# --- the import graph: layers and cycles ---------------------------------------------------

# Imports only go down: a module may import from its own layer and the layers below it.
# ``_native`` (the compiled kernels: block table, block hashing, tree evaluator) sits with the
# core, which calls it, and imports nothing of the package. ``_proto`` (the generated modules
# of kvsched's own gRPC API, kvsched.v1.EndpointPicker) is a wire format like ``codec``: only
# adapters use it. ``scheduler/__init__.py`` holds the version and imports nothing.
LAYERS: dict[str, int] = {
    "": 0,
    "core": 0,
    "workloads": 0,
    "_native": 0,
    "codec": 1,
    "_proto": 1,
    "adapters": 2,
    "sim": 2,
    "server": 3,
    "replay": 3,
    "doctor": 3,
    "demo": 4,
    "bench": 4,
    "tune": 4,
    "cli": 5,
    "__main__": 5,
}
PACKAGE = "scheduler"


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root/scheduler``."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``module`` imports: import statements anywhere in the file (type-only
    ones included) and ``importlib.import_module`` with a literal name. ``from p import x``
    counts as importing ``p.x`` when that is a module, else ``p``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")} - {module}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "")


def import_problems(root: Path) -> list[str]:
    """Every import from a higher layer, every module without a layer, every import cycle."""
    modules = _module_names(root)
    graph = {module: _imported(module, path, modules) for module, path in modules.items()}
    problems = []
    for module, imported in sorted(graph.items()):
        own = _layer(module)
        if own is None:
            problems.append(f"{module}: not in any layer (add its package to LAYERS)")
            continue
        for target in sorted(imported):
            layer = _layer(target)
            if layer is not None and layer > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {layer})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_only_go_down_and_never_in_a_circle() -> None:
    assert import_problems(REPO) == []


def test_the_import_check_finds_an_arrow_up_and_a_circle(tmp_path: Path) -> None:
    files = {
        "scheduler/__init__.py": "",
        "scheduler/core/__init__.py": "",
        "scheduler/core/a.py": "from scheduler.core.b import B\n",
        "scheduler/core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from scheduler.core.a import A\n",
        "scheduler/core/c.py": "import importlib\nimportlib.import_module('scheduler.replay.report')\n",
        "scheduler/codec/__init__.py": "",
        "scheduler/codec/wire.py": "from ..core import a\nfrom scheduler.sim import engine\n",
        "scheduler/sim/__init__.py": "",
        "scheduler/sim/engine.py": "",
        "scheduler/plugins/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_problems(tmp_path) == [
        "scheduler.codec.wire (layer 1) imports scheduler.sim.engine (layer 2)",
        "scheduler.core.c (layer 0) imports scheduler.replay.report (layer 3)",
        "scheduler.plugins: not in any layer (add its package to LAYERS)",
        "import cycle: scheduler.core.a -> scheduler.core.b",
    ]
