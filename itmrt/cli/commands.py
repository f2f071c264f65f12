"""Imports every CLI command module so each registers itself on the app."""

from itmrt.cli import eval_cmd  # noqa: F401
from itmrt.cli import export_cmd, check_cmd  # noqa: F401,E402
from itmrt.cli import infer_cmd, index_cmd  # noqa: F401,E402
