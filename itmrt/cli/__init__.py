"""The ``itmrt`` command line (typer): one module per command, each a thin call into the Python API.

:mod:`~itmrt.cli.app` holds the app and turns an :class:`~itmrt.errors.ItmrtError`
into ``error: ...`` and exit status 2; :mod:`~itmrt.cli.flags` declares the
options several commands share, once.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "main": "itmrt.cli.app",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
