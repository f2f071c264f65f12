"""NAAF's exporter config: the three core graphs, judged against PyTorch at 1e-4."""

from __future__ import annotations

from itmrt.families.export_config import CORE_COMPONENTS, ExportConfig


class NaafExportConfig(ExportConfig):
    family = "naaf"
    components = CORE_COMPONENTS
    parity_tolerance = 1e-4  # float32 on both sides; the value export used for every family before family configs
