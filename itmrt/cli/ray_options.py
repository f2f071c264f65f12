"""The ``--ray`` options ``itmrt infer`` and ``itmrt serve`` share, declared once as a group.

A command decorated with :func:`ray_group` declares one parameter, ``ray``; the group adds the six
flags to its command line and hands it their value as one :class:`itmrt.scale.RayOptions` (None
without ``--ray``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import typer

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


_GROUP: dict[str, tuple[Any, Callable[[], Any]]] = {
    "ray": (str | None, address),
    "ray_workers": (int | None, workers),
    "ray_cpus": (float, cpus),
    "ray_gpus": (float, gpus),
    "ray_retries": (int, retries),
    "ray_timeout_s": (float, timeout_s),
}
"""The group's parameters: name -> (type, the typer option declaring it)."""

CommandT = TypeVar("CommandT", bound=Callable[..., Any])


def ray_group(command: CommandT) -> CommandT:
    """Replace ``command``'s parameter ``ray`` by the group's flags; call it with their :func:`ray_options`."""
    signature = inspect.signature(command)
    if "ray" not in signature.parameters:
        raise TypeError(f"{command.__name__} has no parameter 'ray' for the --ray options")
    kept = [parameter for parameter in signature.parameters.values() if parameter.name != "ray"]
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option(), annotation=kind)
             for name, (kind, option) in _GROUP.items()]

    @functools.wraps(command)
    def with_ray_options(**arguments: Any) -> Any:
        flags = [arguments.pop(name) for name in _GROUP]
        return command(**arguments, ray=ray_options(*flags))

    with_ray_options.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    with_ray_options.__annotations__ = {**{name: value for name, value in command.__annotations__.items()
                                           if name != "ray"},
                                        **{name: kind for name, (kind, _option) in _GROUP.items()}}
    return with_ray_options  # type: ignore[return-value]
