"""What export needs to know of a family beyond its graphs: the exporter config (after Optimum's ``OnnxConfig``).

Each family folder holds one subclass (NAAF: :mod:`itmrt.families.naaf.export_config`)
and its spec returns an instance from :meth:`FamilySpec.export_config`. Export
checks the graphs the spec built against :attr:`ExportConfig.components` and
judges ONNX Runtime against PyTorch with :attr:`ExportConfig.parity_tolerance`
unless the user gives ``--tolerance``.

It also gives what ``itmrt parity`` accepts of each precision
(:attr:`ExportConfig.deployment_tolerances`); export writes them into the
manifest, because that report runs where only the base install is, without any
family's code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from itmrt.bundle.names import Component
from itmrt.bundle.tolerances import DEFAULT_DEPLOYMENT_TOLERANCES, DeploymentTolerance

CORE_COMPONENTS: tuple[str, ...] = (Component.IMAGE_ENCODER.value, Component.TEXT_ENCODER.value,
                                    Component.SCORER.value)
"""The graphs every bundle holds: image encoder, text encoder and scorer."""


class ExportConfig(ABC):
    """One family's exporter config: subclasses fill in every abstract member (class attributes will do)."""

    @property
    @abstractmethod
    def family(self) -> str:
        """The family's name (the spec's ``name``)."""

    @property
    @abstractmethod
    def components(self) -> tuple[str, ...]:
        """The graphs the family's bundle holds (:class:`~itmrt.bundle.names.Component` values)."""

    @property
    @abstractmethod
    def parity_tolerance(self) -> float:
        """Largest ONNX Runtime (CPU, float32) vs PyTorch absolute error export accepts, per graph output."""

    @property
    def deployment_tolerances(self) -> dict[str, DeploymentTolerance]:
        """Precision -> what ``itmrt parity`` accepts of the deployed graphs; a family overrides what differs."""
        return dict(DEFAULT_DEPLOYMENT_TOLERANCES)

    def check_components(self, built: list[str]) -> list[str]:
        """Problems with the graphs a spec built (names missing or not declared); empty when they match."""
        declared = set(self.components)
        missing = [f"{name} is missing" for name in self.components if name not in built]
        extra = [f"{name} is not declared" for name in built if name not in declared]
        return missing + extra

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family!r} tolerance {self.parity_tolerance:g}>"
