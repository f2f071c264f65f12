"""Optional dependencies, imported lazily through one function with one message format.

The base install is numpy + onnx + onnxruntime + typer; everything else comes
with an extra (``pip install 'itmrt[cpu]'`` and so on). Code that needs an
optional module asks for it here, at the point of use::

    numba = require("numba")                 # the module, or a one-line MissingDependency
    if available("tensorrt"): ...            # a cheap check that imports nothing
    trt = lazy_import("tensorrt")            # a proxy that imports on first attribute access

so ``import itmrt.runtime`` never pulls in numba, TensorRT or torch, and a
missing package is always reported the same way: what needs it, the pip
package, and the extra that installs it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from itmrt.errors import ItmrtError


class MissingDependency(ItmrtError):
    """An optional package this feature needs is not installed (or is not usable) here."""


@dataclass(frozen=True)
class Dependency:
    """An optional module: the pip package that provides it, the itmrt extra, what it is for."""

    package: str
    extra: str | None
    purpose: str
    usable: Callable[[ModuleType], bool] | None = None  # rejects an import that is not the real thing
    hint: str = ""


def _real_tensorrt(module: ModuleType) -> bool:
    # ``tensorrt-stubs`` installed into site-packages imports as an empty namespace package.
    return hasattr(module, "Builder")


DEPENDENCIES: dict[str, Dependency] = {
    "torch": Dependency("torch", "export", "the PyTorch reference (export, eval, train, parity against torch)"),
    "numba": Dependency("numba", "cpu", "the fused CPU scorer", hint=" (or choose scorer='graph')"),
    "tensorrt": Dependency(
        "tensorrt", "trt", "TensorRT engines", usable=_real_tensorrt,
        hint="; on Jetson use JetPack's system TensorRT (python3-libnvinfer) in a venv made with "
        "--system-site-packages",
    ),
    "pycuda": Dependency("pycuda", "trt", "the native TensorRT backend's CUDA memory and streams"),
    "onnxconverter_common": Dependency("onnxconverter-common", "fp16", "FP16 graph conversion"),
    "matplotlib": Dependency("matplotlib", "reports", "plots in reports"),
    "jsonschema": Dependency("jsonschema", "reports", "JSON Schema validation"),
    "PIL": Dependency("Pillow", "images", "reading image files"),
    "fastapi": Dependency("fastapi", "serve", "itmrt serve"),
    "starlette": Dependency("starlette", "serve", "itmrt serve"),
    "uvicorn": Dependency("uvicorn", "serve", "itmrt serve"),
    "prometheus_client": Dependency("prometheus-client", "serve", "the service's /metrics"),
    "faiss": Dependency("faiss-cpu", "scale", "the FAISS shortlist index", hint=" (faiss-gpu where CUDA is available)"),
    "ray": Dependency("ray", "ray", "distributed search on Ray"),
}


def _dependency(name: str) -> Dependency:
    top = name.split(".", 1)[0]
    return DEPENDENCIES.get(top) or Dependency(top, None, f"this feature ({top})")


def missing_message(names: str | list[str], purpose: str | None = None) -> str:
    """The one-line message for optional modules ``names`` that cannot be imported."""
    deps = [_dependency(name) for name in ([names] if isinstance(names, str) else names)]
    packages = " and ".join(dict.fromkeys(dep.package for dep in deps))
    extras = list(dict.fromkeys(dep.extra for dep in deps if dep.extra))
    others = [dep.package for dep in deps if not dep.extra]
    how = " ".join(
        [f"pip install 'itmrt[{','.join(extras)}]'"] * bool(extras) + [f"pip install {' '.join(others)}"] * bool(others)
    )
    noun = "package, which is" if len(deps) == 1 else "packages, which are"
    hints = "".join(dict.fromkeys(dep.hint for dep in deps))
    return f"{purpose or deps[0].purpose} needs the {packages} {noun} not installed here: {how}{hints}"


def available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a broken install counts as absent).

    For modules with a usability check (TensorRT against its type stubs) this
    imports the module, since only the module itself can tell.
    """
    dep = _dependency(name)
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        return False
    if dep.usable is None:
        return True
    try:
        return dep.usable(importlib.import_module(name))
    except Exception:  # noqa: BLE001 - a module that fails to import is as good as absent
        return False


def require(name: str, purpose: str | None = None) -> ModuleType:
    """Import ``name`` now, or raise :class:`MissingDependency` with the install command.

    An ``ImportError`` raised *inside* the package (a missing shared library, a
    broken build) is reported with its first line, since reinstalling is the fix.
    """
    dep = _dependency(name)
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise MissingDependency(missing_message(name, purpose)) from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingDependency(
            f"{purpose or dep.purpose}: the {dep.package} package is installed but cannot be imported ({detail})"
        ) from None
    if dep.usable is not None and not dep.usable(module):
        raise MissingDependency(missing_message(name, purpose))
    return module


class LazyModule:
    """A module proxy that imports on first attribute access (through :func:`require`)."""

    def __init__(self, name: str, purpose: str | None = None) -> None:
        self._name, self._purpose = name, purpose
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._module is None:
            self._module = require(self._name, self._purpose)
        return getattr(self._module, attribute)


def lazy_import(name: str, purpose: str | None = None) -> Any:
    """A proxy for ``name``, imported (or reported missing) when first used."""
    return LazyModule(name, purpose)


@functools.cache
def compiled_kernels(module: str) -> ModuleType | None:
    """One of itmrt's modules of numba kernels (``itmrt.runtime.compact_kernels``, ...), imported on first use,
    where numba is installed (the ``cpu`` extra); None otherwise, and its callers run their numpy code."""
    return importlib.import_module(module) if available("numba") else None


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``exports[name]`` (a module path) on first access, so a
    package can name its API without importing its heavy modules when it is imported."""

    def attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return attribute


def require_all(names: list[str], purpose: str) -> list[ModuleType]:
    """Import every module of ``names``; when any is missing, one message names all that are."""
    missing = [name for name in names if not available(name)]
    if missing:
        raise MissingDependency(missing_message(missing, purpose))
    return [require(name, purpose) for name in names]


def torch_side(module: str, purpose: str) -> ModuleType:
    """Import ``module``, one of itmrt's PyTorch-side modules, for a torch-free caller that needs it now.

    The one seam between the torch-free packages and the torch side (the
    package rule in ``tests/test_code_structure.py`` forbids static imports):
    ``itmrt parity --against torch`` reaches its PyTorch reference here, and a
    base install without torch gets the usual one-line message.
    """
    require("torch", purpose)
    if not module.startswith("itmrt."):
        raise ValueError(f"{module} is not an itmrt module")
    return importlib.import_module(module)

