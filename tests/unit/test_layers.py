"""The import layering of ``qtool/``: no upward imports, no cycles, steps independent of each other.

The layers, lowest first; a module may import modules of its own layer or of a lower one:

0. ``qtool`` (the package: version), ``qtool.errors``, ``qtool.log``, ``qtool.config``, ``qtool.dist``,
   ``qtool.allocator``
1. ``qtool.quant``: quantizers, packing, the scheme
2. ``qtool.algorithms``: GPTQ, Hadamard, low-rank, BiSup and KV-smoothing math (tensors in, tensors out)
3. ``qtool.ops``: kernels and their pure-PyTorch references
4. ``qtool.models``, ``qtool.data``: the fake-quant model, its run-time features; datasets
5. ``qtool.export``, ``qtool.eval``, ``qtool.generate``: checkpoints, perplexity, decoding
6. ``qtool.steps``: recipe steps (a step imports only ``steps.registry``, ``steps.base``,
   ``steps.layerwise`` of its package, never another step)
7. ``qtool.recipe``: the YAML recipe (validates steps through the registry)
8. ``qtool.bench``: timing harnesses
9. ``qtool.api``: what the CLI calls
10. ``qtool.cli``, ``qtool.__main__``

Every import counts, also those inside functions (only ``if TYPE_CHECKING:`` blocks are skipped).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QTOOL = Path(__file__).resolve().parents[2] / "qtool"

LAYERS: list[set[str]] = [
    {"qtool", "qtool.errors", "qtool.log", "qtool.config", "qtool.dist", "qtool.allocator"},
    {"qtool.quant"},
    {"qtool.algorithms"},
    {"qtool.ops"},
    {"qtool.models", "qtool.data"},
    {"qtool.export", "qtool.eval", "qtool.generate"},
    {"qtool.steps"},
    {"qtool.recipe"},
    {"qtool.bench"},
    {"qtool.api"},
    {"qtool.cli", "qtool.__main__"},
]
STEP_INFRA = {"qtool.steps", "qtool.steps.registry", "qtool.steps.base", "qtool.steps.layerwise"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in (2, 1):
        head = ".".join(parts[:n])
        for i, group in enumerate(LAYERS):
            if head in group:
                return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS (and to the docstring)")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The qtool modules ``tree`` imports (absolute names; relative imports resolved)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qtool")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] == "qtool":
                found.add(base)
                # `from qtool.steps import rtn` imports the submodule qtool.steps.rtn
                found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: qtool modules it imports}`` for every module under ``root`` (the qtool folder)."""
    files = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        files[".".join(parts)] = (f, is_package)
    graph = {}
    for module, (f, is_package) in files.items():
        names = imports_of(ast.parse(f.read_text()), module, is_package)
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                out.append(f"upward import: {module} (layer {layer_of(module)}) imports {target}")
            if (
                module.startswith("qtool.steps.")
                and module not in STEP_INFRA
                and target.startswith("qtool.steps")
                and target not in STEP_INFRA
            ):
                out.append(f"step imports a step: {module} imports {target}")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_qtool_has_no_upward_imports_no_cycles_and_independent_steps():
    assert violations(QTOOL) == []


@pytest.mark.parametrize(
    "module,planted,expected",
    [
        (
            "quant/packing.py",
            "from qtool.models.qlinear import QLinear",
            "upward import: qtool.quant.packing",
        ),
        ("steps/rtn.py", "from qtool.steps.gptq import GPTQ", "step imports a step: qtool.steps.rtn"),
        ("models/lora.py", "from qtool.export.loader import load_checkpoint", "upward import"),
        (
            "export/writer.py",
            "    from qtool.steps.base import Context",
            "upward import: qtool.export.writer",
        ),
        ("algorithms/gptq.py", "from qtool.algorithms import lowrank", "import cycle"),
    ],
)
def test_the_check_catches_a_planted_violation(tmp_path, module, planted, expected):
    tree = tmp_path / "qtool"
    shutil.copytree(QTOOL, tree, ignore=shutil.ignore_patterns("__pycache__"))
    f = tree / module
    body = f"def _planted():\n{planted if planted.startswith(' ') else '    ' + planted}\n"
    f.write_text(f.read_text() + "\n\n" + body)
    found = violations(tree)
    assert any(v.startswith(expected) for v in found), found


def test_loading_a_checkpoint_reaches_no_step_and_no_recipe():
    graph = import_graph(QTOOL)
    reach = reachable(graph, "qtool.export.loader")
    assert "qtool.models.features" in reach
    assert not {m for m in reach if m.startswith(("qtool.steps", "qtool.recipe"))}
    code = (
        "import sys, qtool.export.loader, qtool.models.features, qtool.quant.scheme;"
        "bad = sorted(m for m in sys.modules if m.startswith(('qtool.steps', 'qtool.recipe')));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
