"""SCAN's exporter config."""

from __future__ import annotations

from itmrt.families.export_config import CORE_COMPONENTS, ExportConfig


class ScanExportConfig(ExportConfig):
    """SCAN's exporter config: the three core graphs, judged against PyTorch at 1e-4 (float32 on both sides)."""

    family = "scan"
    components = CORE_COMPONENTS
    parity_tolerance = 1e-4
