"""Every package names its public API the same way, and every name it lists is there.

The style: ``_EXPORTS`` maps each public name to the module that defines it, ``__all__`` is built from it
(plus names the ``__init__`` defines itself), and ``__getattr__ = lazy_exports(__name__, _EXPORTS)``
imports a name's module on first use, so importing a package stays cheap and torch-free.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "itmrt"
PACKAGES = sorted(path.parent.name for path in PACKAGE_ROOT.glob("*/__init__.py"))


def _assigned_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_declares_its_api_in_the_common_style(package: str) -> None:
    source = (PACKAGE_ROOT / package / "__init__.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"itmrt.{package} has no docstring"
    assert {"_EXPORTS", "__all__", "__getattr__"} <= _assigned_names(tree), f"itmrt.{package}"
    assert "__getattr__ = lazy_exports(__name__, _EXPORTS)" in source, f"itmrt.{package}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_name_is_there_and_from_the_module_the_map_names(package: str) -> None:
    module = importlib.import_module(f"itmrt.{package}")
    assert module.__all__ == sorted(module.__all__) and len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        source = module._EXPORTS.get(name)
        if source is not None:
            assert getattr(importlib.import_module(source), name) is value, (package, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_name_is_also_a_submodule(package: str) -> None:
    """Once ``itmrt.P.X`` is imported as a module, the attribute ``X`` of ``itmrt.P`` is that module."""
    module = importlib.import_module(f"itmrt.{package}")
    submodules = {path.stem for path in (PACKAGE_ROOT / package).glob("*.py")}
    assert not set(module.__all__) & submodules, package


def test_an_unknown_name_is_an_attribute_error_naming_the_package() -> None:
    import itmrt.bundle

    with pytest.raises(AttributeError, match="'itmrt.bundle' has no attribute 'read_manifests'"):
        itmrt.bundle.read_manifests  # noqa: B018
