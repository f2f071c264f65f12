"""The shape of the code, read statically (ast): no import cycle between itmrt's packages, a torch-free side
that never imports the torch side, no long functions.

Packages are itmrt's subpackages (``itmrt.runtime``, ``itmrt.bundle``, ...) and
its top-level modules (``itmrt.publish``, ``itmrt.demo``, ...). Every import counts,
also one inside a function (a late import still means one package needs the
other), except under ``if TYPE_CHECKING:`` (type hints only). ``itmrt/__init__.py``
is the package's facade (``__version__`` and a lazy ``itmrt.load``), not a layer.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "itmrt"
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_EXCEPTIONS = {
    # numba kernels: one loop nest each, kept whole so numba compiles it into one pass.
    "itmrt/runtime/fused_kernels.py:score_tile",
    # The demo's script, one step after another as it prints them.
    "itmrt/demo.py:run_demo",
}
"""Functions allowed over the limit (the project's rule excepts ONNX graph builders and numba kernels)."""

TORCH_SIDE = frozenset({"families", "models", "graphs", "export", "train"})
"""itmrt's PyTorch side: the family registry, reference models, graph builders, export and training."""
TORCH_FREE = frozenset({"bundle", "text", "data", "metrics", "synthetic", "runtime", "serve", "scale", "precision",
                        "build", "engine", "machine", "reports", "publish", "documents", "errors", "optional",
                        "limits", "timings"})
"""What opens, checks, builds, searches, serves and reports on a bundle: never imports the torch side or torch
(a bundle describes itself in its manifest; ``itmrt.optional.torch_side`` is the one named seam)."""
TORCH_MODULES = frozenset({"torch", "torchvision"})


def _layer(module: str) -> str | None:
    """``itmrt.runtime.api`` -> ``runtime``; ``itmrt.publish`` -> ``publish``; ``itmrt`` itself -> None (the facade)."""
    parts = module.split(".")
    if parts[0] != "itmrt" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (itmrt's and others') with its line, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_blocks(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found.extend((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
    return found


def package_graph(root: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """``{layer: {layer it imports: ["file:line", ...]}}`` over every module of itmrt (the package at ``root``)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        source = _layer(_module_name(path, root))
        if source is None:
            continue
        graph.setdefault(source, defaultdict(list))
        for name, line in _imported_modules(path):
            while name not in modules and "." in name:  # ``from itmrt.x import function`` -> itmrt.x
                name = name.rsplit(".", 1)[0]
            target = _layer(name) if name in modules else None
            if target is not None and target != source:
                graph[source][target].append(f"{path.relative_to(root.parent).as_posix()}:{line}")
    return graph


def torch_side_imports(root: Path = PACKAGE) -> list[str]:
    """``file:line imports X`` for every import of the torch side (or torch) by a torch-free package."""
    found = [
        f"{where} imports itmrt.{target} (the torch side)"
        for source, targets in package_graph(root).items() if source in TORCH_FREE
        for target, places in targets.items() if target in TORCH_SIDE
        for where in places
    ]
    for path in sorted(root.rglob("*.py")):
        if _layer(_module_name(path, root)) in TORCH_FREE:
            found.extend(
                f"{path.relative_to(root.parent).as_posix()}:{line} imports {name}"
                for name, line in _imported_modules(path) if name.split(".")[0] in TORCH_MODULES
            )
    return sorted(set(found))


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one layer (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
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


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    assert {"bundle", "runtime", "families", "export", "precision", "build", "engine", "machine"} <= set(graph)
    problems = []
    for component in _cycles(graph):
        edges = [f"{a} -> {b} ({graph[a][b][0]})" for a in component for b in component if b in graph[a]]
        problems.append(f"cycle between {', '.join(component)}: " + "; ".join(edges))
    assert not problems, "\n".join(problems)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:1"]}, "d": {"a": ["d.py:1"]}}
    assert _cycles(graph) == [["a", "b", "c"]]  # type: ignore[arg-type]


def test_the_torch_free_packages_never_import_the_torch_side() -> None:
    problems = torch_side_imports()
    assert not problems, "\n".join(problems)
    # The one seam (itmrt.optional.torch_side, an import by name) has one user: parity against PyTorch; no other
    # torch-free module names a torch-side module in a string (a lazy export, importlib) either.
    users = sorted(
        path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*.py")
        if _layer(_module_name(path)) in TORCH_FREE and path.name != "optional.py"
        and "torch_side(" in path.read_text(encoding="utf-8")
    )
    assert users == ["itmrt/reports/parity_report.py"], users
    pattern = re.compile(rf"itmrt\.({'|'.join(sorted(TORCH_SIDE))})(\.\w+)*")
    named = sorted(
        (path.relative_to(PACKAGE.parent).as_posix(), node.value) for path in PACKAGE.rglob("*.py")
        if _layer(_module_name(path)) in TORCH_FREE
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value)
    )
    assert named == [("itmrt/reports/parity_report.py", "itmrt.families.reference")], named


def test_the_torch_side_rule_catches_a_violation(tmp_path: Path) -> None:
    """The rule read on a made-up itmrt: a late import of the registry and a top-level torch import in the runtime
    are both found; a type-checking import, the torch side's own imports and a torch-free import are not."""
    root = tmp_path / "itmrt"
    sources = {
        "__init__.py": "",
        "errors.py": "",
        "families/__init__.py": "import torch\nfrom itmrt.runtime import api\n",
        "runtime/__init__.py": "",
        "runtime/api.py": (
            "from __future__ import annotations\n"
            "from typing import TYPE_CHECKING\n"
            "from itmrt.errors import *\n"
            "if TYPE_CHECKING:\n"
            "    from itmrt.families import FamilySpec\n"
            "def spec(name: str) -> FamilySpec:\n"
            "    from itmrt.families import get\n"
            "    return get(name)\n"
            "import torch.nn\n"
        ),
    }
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert torch_side_imports(root) == [
        "itmrt/runtime/api.py:7 imports itmrt.families (the torch side)",
        "itmrt/runtime/api.py:9 imports torch.nn",
    ]


def test_the_torch_free_packages_import_without_torch() -> None:
    """The family registry sits below the runtime: importing it (and all the runtime uses) never imports
    torch; only the methods export and training call do."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import itmrt.runtime, itmrt.bundle.check, itmrt.families, itmrt.precision.precision_graphs, "
        "itmrt.engine.build\n"
        "import itmrt.reports.parity_report, itmrt.cli.app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def long_functions() -> list[str]:
    """``file:function lines`` of every function longer than MAX_FUNCTION_LINES lines."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(PACKAGE.parent).as_posix()}:{node.name} {lines}")
    return found


def test_no_function_is_over_80_lines_but_the_named_exceptions() -> None:
    long = [entry for entry in long_functions() if entry.split(" ")[0] not in LONG_FUNCTION_EXCEPTIONS]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
