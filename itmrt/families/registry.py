"""The registry of model families: each spec registered once, looked up by name (or by a model's ``family``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from itmrt.bundle.names import forget_family, note_family
from itmrt.errors import ItmrtError
from itmrt.families.spec import FamilySpec

_FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` under ``spec.name``; a name can be registered once."""
    if spec.name in _FAMILIES:
        raise ValueError(f"a model family named {spec.name!r} is already registered ({_FAMILIES[spec.name]!r})")
    _FAMILIES[spec.name] = spec
    note_family(spec.name, spec)
    return spec


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)
    forget_family(name)


@contextmanager
def registered(spec: FamilySpec) -> Iterator[FamilySpec]:
    """``spec`` registered for the duration of a ``with`` block (a family defined outside itmrt, a test's)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def names() -> tuple[str, ...]:
    """Names of the registered families, in registration order."""
    return tuple(_FAMILIES)


def get(name: str) -> FamilySpec:
    """The spec of family ``name``; a one-line :class:`ItmrtError` for a name no spec has."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ItmrtError(f"unknown model family {name!r}; this itmrt knows {', '.join(_FAMILIES)}") from None


def family_of(model: Any) -> FamilySpec:
    """The spec of a reference model (every reference model class names its family in ``family``)."""
    name = getattr(model, "family", None)
    if not isinstance(name, str):
        raise ItmrtError(f"a {type(model).__name__} is not a model of any itmrt family")
    return get(name)


def threshold_families() -> list[str]:
    """Families whose export freezes a learned threshold (``--threshold`` applies to them)."""
    return [name for name, spec in _FAMILIES.items() if spec.learns_threshold]
