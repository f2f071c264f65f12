"""The ``itmrt`` command line (typer): one module per command, each a thin call into the Python API.

:mod:`~itmrt.cli.app` holds the app and turns an :class:`~itmrt.errors.ItmrtError`
into ``error: ...`` and exit status 2; :mod:`~itmrt.cli.options` declares the
options several commands share, once.
"""
