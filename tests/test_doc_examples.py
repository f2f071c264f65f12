"""README's and docs/' Python: every itmrt name they cite exists, and the examples that run on a CPU run.

- Every ```python block is parsed; its ``import``s of itmrt and its ``itmrt.a.b`` chains must resolve.
- Every inline code span of the prose naming ``itmrt.something`` must resolve too (a wrong name in a
  sentence misleads as much as one in an example).
- The blocks listed in :data:`RUNNABLE` run, in a folder laid out as the quickstart leaves it.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = {"README.md": [0], "docs/python-api.md": [0]}
"""Blocks (by position on their page) that need only the quickstart's folder: they run here."""

_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
_INLINE_NAME = re.compile(r"`[^`]*?\b(itmrt(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _page_name(page: Path) -> str:
    return str(page.relative_to(REPO))


def python_blocks(page: Path) -> list[str]:
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


def resolve(dotted: str) -> Any:
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not dotted.startswith(exc.name):
                raise  # a dependency of the module is missing, not the name
            continue
        break
    else:
        raise AssertionError(f"{dotted}: no such module")
    for name in parts[cut:]:
        if not hasattr(found, name):
            raise AssertionError(f"{dotted}: {'.'.join(parts[:parts.index(name)])} has no {name!r}")
        found = getattr(found, name)
    return found


def _cited_names(code: str) -> set[str]:
    """itmrt names a block imports or uses as ``itmrt.a.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "itmrt":
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "itmrt")
        elif isinstance(node, ast.Attribute):
            chain = []
            current: ast.expr = node
            while isinstance(current, ast.Attribute):
                chain.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id == "itmrt":
                names.add(".".join(["itmrt", *reversed(chain)]))
    return names


@pytest.mark.parametrize("page", PAGES, ids=_page_name)
def test_every_itmrt_name_a_page_cites_exists(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    cited = {name for code in python_blocks(page) for name in _cited_names(code)}
    prose = _BLOCK.sub("", text)
    cited |= {match.rstrip(".") for match in _INLINE_NAME.findall(prose)}
    missing = []
    for name in sorted(cited):
        try:
            resolve(name)
        except AssertionError as exc:
            missing.append(str(exc))
    assert not missing, f"{_page_name(page)} cites names that do not exist: {missing}"


def test_the_checker_catches_a_wrong_name() -> None:
    assert resolve("itmrt.bundle.read_manifest") is not None
    with pytest.raises(AssertionError, match="has no 'read_manifests'"):
        resolve("itmrt.bundle.read_manifests")
    assert _cited_names("from itmrt.scale import open_shards\nitmrt.load\n") == {"itmrt.scale.open_shards",
                                                                                  "itmrt.load"}


def test_the_runnable_blocks_are_there() -> None:
    for name, indices in RUNNABLE.items():
        assert max(indices) < len(python_blocks(REPO / name)), name


@pytest.fixture(scope="module")
def quickstart_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/``, ``bundle/`` and ``gallery/`` as docs/quickstart.md's commands leave them (made through the API)."""
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.runtime import load
    from itmrt.runtime.gallery import load_features
    from itmrt.train.recipes import SHIPPED_FILES, SHIPPED_VOCAB, make_sample_data

    assets = REPO / "itmrt" / "assets"
    if not (assets / SHIPPED_FILES["naaf"]).is_file():
        pytest.skip("no shipped small NAAF")
    folder = tmp_path_factory.mktemp("quickstart")
    make_sample_data(folder / "data", 10)
    export_bundle(assets / SHIPPED_FILES["naaf"], assets / SHIPPED_VOCAB, folder / "bundle", ExportOptions())
    with load(folder / "bundle") as runtime:
        runtime.index(load_features(folder / "data" / "test_ims.npy"), folder / "gallery")
    return folder


@pytest.mark.parametrize(("name", "index"), [(n, i) for n, indices in RUNNABLE.items() for i in indices])
def test_the_examples_run(quickstart_folder: Path, monkeypatch: pytest.MonkeyPatch, name: str, index: int) -> None:
    monkeypatch.chdir(quickstart_folder)
    code = python_blocks(REPO / name)[index]
    exec(compile(code, f"{name} python block {index}", "exec"), {"__name__": "__doc_example__"})
