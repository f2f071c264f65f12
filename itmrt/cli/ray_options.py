"""The ``--ray`` options ``itmrt infer`` and ``itmrt serve`` share, declared once as a group.

A command decorated with :data:`ray_group` (an :class:`~itmrt.cli.groups.OptionGroup`) declares one
parameter, ``ray``; the group puts the six flags in its place on the command line and hands the
command their value as one :class:`itmrt.scale.RayOptions` (None without ``--ray``).
"""

from __future__ import annotations

from typing import Any

import typer

from itmrt.cli.groups import Flag, OptionGroup
from itmrt.errors import ItmrtError

ADDRESS_HELP = (
    "Search a sharded gallery on Ray: 'local' starts a Ray instance on this machine for the command, 'auto' joins "
    "the running cluster (RAY_ADDRESS or the latest `ray start`), or give the cluster's address (HOST:PORT, "
    "ray://HOST:PORT). Needs itmrt[ray]."
)


def address() -> Any:
    return typer.Option(None, "--ray", help=ADDRESS_HELP)


def workers() -> Any:
    return typer.Option(
        None, "--ray-workers", min=1, help="Ray actors (default: one per shard; fewer: shards grouped)."
    )


def cpus() -> Any:
    return typer.Option(
        1.0, "--ray-cpus", min=0.01, help="CPUs each actor declares (its runtime's threads, rounded up)."
    )


def gpus() -> Any:
    return typer.Option(0.0, "--ray-gpus", min=0.0, help="GPUs each actor declares (> 0: its runtime runs on CUDA).")


def retries() -> Any:
    return typer.Option(1, "--ray-retries", min=0, help="Restarts of a lost actor within one search, then an error.")


def timeout_s() -> Any:
    return typer.Option(600.0, "--ray-timeout-s", min=0.001, help="Seconds for the actors to start, and per search.")


def ray_options(ray: str | None, workers: int | None, cpus: float, gpus: float, retries: int, timeout_s: float) -> Any:
    """:class:`itmrt.scale.RayOptions` from the flags, or None without ``--ray``."""
    if ray is None:
        if workers is not None:
            raise ItmrtError("--ray-workers needs --ray")
        return None
    from itmrt.scale.ray_search import RayOptions

    return RayOptions(ray.strip(), workers, cpus, gpus, retries, timeout_s).check()


ray_group = OptionGroup("ray", {
    "ray": Flag(str | None, address),
    "ray_workers": Flag(int | None, workers),
    "ray_cpus": Flag(float, cpus),
    "ray_gpus": Flag(float, gpus),
    "ray_retries": Flag(int, retries),
    "ray_timeout_s": Flag(float, timeout_s),
}, lambda ray, ray_workers, ray_cpus, ray_gpus, ray_retries, ray_timeout_s: ray_options(
    ray, ray_workers, ray_cpus, ray_gpus, ray_retries, ray_timeout_s))
"""Decorates a command whose parameter ``ray`` becomes the six flags, and receives their :func:`ray_options`."""
