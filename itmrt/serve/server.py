"""``itmrt serve`` as a Python API: :class:`Service` binds a socket, runs uvicorn, and stops gracefully.

::

    from itmrt.serve import ServeOptions, Service
    service = Service("gallery/", options=ServeOptions(port=8000))
    service.run()            # until SIGINT / SIGTERM (or service.stop() from another thread)

The socket is bound before anything is loaded, so a busy port is a one-line
error at once and ``/v2/health/live`` answers while the worker thread loads the
bundle and gallery and warms them up; ``/v2/health/ready`` turns 200 after
that. On SIGINT or SIGTERM uvicorn stops accepting connections, every request
already received is answered, the worker finishes its queue, and ``run``
returns (the process exits 0). A gallery that cannot be loaded stops the
service and ``run`` raises :class:`ItmrtError` with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmrt.bundle.names import BackendName, Precision, parse_choice
from itmrt.errors import ItmrtError
from itmrt.optional import require, require_all
from itmrt.runtime.options import OnLong, RuntimeOptions, ScorerChoice
from itmrt.scale.layout import is_sharded_gallery
from itmrt.serve.app import HttpLimits, create_app
from itmrt.serve.auth import read_token_file
from itmrt.serve.batcher import Batcher, BatchSettings
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.searcher import Searcher, open_runtime_searcher

log = logging.getLogger("itmrt.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``itmrt serve`` takes besides the gallery (see its ``--help``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: BackendName = BackendName.ORT
    precision: Precision = Precision.FP32
    providers: list[str] | None = None
    threads: int = 0
    scorer: ScorerChoice = ScorerChoice.AUTO
    memory_mb: int = 32
    on_long: OnLong = OnLong.REFUSE
    batch: BatchSettings = field(default_factory=BatchSettings)
    limits: HttpLimits = field(default_factory=HttpLimits)
    token_file: Path | None = None
    max_connections: int = 1024
    access_log: bool = False
    shortlist: int | None = None  # sharded galleries: rerank each shard's K best candidates
    ray: Any = None  # sharded galleries: itmrt.scale.RayOptions to search the shards on Ray actors
    configure_logging: bool = True  # False: leave logging as the embedding application set it up
    # The runtime options as one group (what `itmrt serve`'s runtime flags build), instead of the fields backend
    # .. on_long above, which are then set from it; its on_long is the service's (refuse: 400).
    runtime: RuntimeOptions | None = None

    def __post_init__(self) -> None:
        if self.runtime is not None:
            _runtime_fields_from(self, self.runtime)
            return
        # Plain strings are accepted and checked here, once, with the choices in the message.
        object.__setattr__(self, "backend", parse_choice(BackendName, self.backend, "backend"))
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "precision"))
        object.__setattr__(self, "scorer", parse_choice(ScorerChoice, self.scorer, "scorer"))
        object.__setattr__(self, "on_long", parse_choice(OnLong, self.on_long, "--on-long"))

    def runtime_options(self) -> RuntimeOptions:
        """The runtime group the service loads its bundle with (``runtime``, or the one its fields make)."""
        if self.runtime is not None:
            return self.runtime
        return RuntimeOptions(backend=self.backend, precision=self.precision, providers=self.providers,
                              threads=self.threads, scorer=self.scorer, budget_bytes=self.memory_mb << 20,
                              on_long=self.on_long)


_RUNTIME_FIELDS = ("backend", "precision", "providers", "threads", "scorer", "memory_mb", "on_long")


def _runtime_fields_from(options: ServeOptions, runtime: RuntimeOptions) -> None:
    """Set ``options``' runtime fields from ``runtime``; refuse a field given another value both ways."""
    values = {name: getattr(runtime, name) for name in _RUNTIME_FIELDS if name != "memory_mb"}
    values["providers"] = None if runtime.providers is None else list(runtime.providers)
    values["memory_mb"] = runtime.budget_bytes >> 20
    defaults = ServeOptions()
    both = [name for name, value in values.items() if getattr(options, name) not in (value, getattr(defaults, name))]
    if both:
        raise ItmrtError(f"give the runtime options either as ServeOptions(runtime=...) or as its fields, not both "
                         f"({', '.join(both)})")
    for name, value in values.items():
        object.__setattr__(options, name, value)


def _sharded_searcher(gallery: Path, options: ServeOptions, load_options: dict[str, Any]) -> Callable[[], Searcher]:
    """The searcher factory of a sharded gallery (its shards in this process, or on Ray with ``options.ray``)."""
    from itmrt.scale.layout import read_sharded_gallery
    from itmrt.serve.sharded import open_sharded_searcher

    read_sharded_gallery(gallery)  # a missing or broken gallery is reported before the port is taken
    if options.shortlist is not None and options.shortlist < 1:
        raise ItmrtError(f"--shortlist must be at least 1, not {options.shortlist}")
    return lambda: open_sharded_searcher(gallery, ray=options.ray, on_long=options.on_long,
                                         shortlist=options.shortlist, warn=log.warning, **load_options)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say so,
    # and a response written in two parts (headers, body) would otherwise wait ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from now on, while the server starts
    except OSError as exc:
        sock.close()
        raise ItmrtError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from None
    return sock


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's logging configuration, with itmrt's service messages on its stderr handler."""
    uvicorn_config = require("uvicorn.config", "itmrt serve")
    config = copy.deepcopy(uvicorn_config.LOGGING_CONFIG)
    config["loggers"]["itmrt"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def _ignore_signal(signum: int, frame: Any) -> None:
    """Stands in for the default handlers while uvicorn runs (see :func:`_exit_zero_after_signal`)."""


@contextlib.contextmanager
def _exit_zero_after_signal() -> Iterator[None]:
    """uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again for the handler that was
    installed before it (by default: KeyboardInterrupt, or death by SIGTERM). A handler that ignores it lets
    ``run`` return normally once every request is answered, so the process exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Service:
    """One ``itmrt serve`` process: a gallery behind the Open Inference Protocol on ``host:port``.

    ``source``: a gallery folder (its bundle is the one that made it), or a
    bundle folder with ``gallery``. ``searcher``: a factory that stands in for
    the one-process runtime searcher (a sharded gallery, for instance); it is
    called on the worker thread.
    """

    def __init__(
        self,
        source: str | Path | None,
        gallery: str | Path | None = None,
        options: ServeOptions | None = None,
        searcher: Callable[[], Searcher] | None = None,
    ) -> None:
        self.options = options = options or ServeOptions()
        uvicorn = require_all(["starlette", "uvicorn", "prometheus_client"], "itmrt serve")[1]
        if searcher is None:
            searcher = self._runtime_searcher(source, gallery, options)
        token = read_token_file(options.token_file) if options.token_file is not None else None
        self.metrics = ServiceMetrics()
        self.batcher = Batcher(searcher, options.batch, self.metrics, on_failure=lambda _reason: self.stop())
        self.app = create_app(self.batcher, self.metrics, options.limits, token)
        self.socket = bind_socket(options.host, options.port)
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            log_config=_log_config() if options.configure_logging else None,
            access_log=options.access_log,
            lifespan="on",
            limit_concurrency=options.max_connections,
            timeout_graceful_shutdown=math.ceil(options.limits.timeout_s) + 5,
        )
        self.server = uvicorn.Server(config)

    @staticmethod
    def _runtime_searcher(source: Any, gallery: Any, options: ServeOptions) -> Callable[[], Searcher]:
        from itmrt.bundle.folder import read_bundle
        from itmrt.runtime.gallery import gallery_source, read_gallery

        if source is None:
            raise ItmrtError("give a gallery folder, or a bundle folder and --gallery")
        bundle_path, gallery_path = gallery_source(source, gallery)
        if gallery_path is None:
            raise ItmrtError(
                f"{source} is a bundle: pass --gallery GALLERY "
                f"(make one with `itmrt index {source} --images ... --out GALLERY`)"
            )
        # The runtime group as keywords (the Ray actors take them too); on_long and warn are the searcher's.
        load_options = {name: value for name, value in options.runtime_options().load_keywords().items()
                        if name not in ("on_long", "warn")}
        if is_sharded_gallery(gallery_path):
            return _sharded_searcher(gallery_path, options, load_options)
        if options.ray is not None or options.shortlist is not None:
            raise ItmrtError("--ray and --shortlist search a sharded gallery; make one with `itmrt index ... "
                             "--shard-images N`")
        # A missing or broken gallery, or one another bundle made, is reported before the port is taken.
        read_gallery(gallery_path).check_bundle(read_bundle(bundle_path))
        return lambda: open_runtime_searcher(bundle_path, gallery_path, options.on_long, log.warning, **load_options)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM or :meth:`stop`; raise :class:`ItmrtError` if the gallery failed to load."""
        log.info("listening on %s; loading the gallery", self.url)
        if self.options.token_file is None and not _loopback(str(self.host)):
            log.warning("listening on %s without --token-file: anyone who can reach it can query it", self.host)
        with _exit_zero_after_signal():
            self.server.run(sockets=[self.socket])
        self.socket.close()
        if self.batcher.failure is not None:
            raise ItmrtError(f"the service stopped: {self.batcher.failure}")

    def stop(self) -> None:
        """Ask the server to stop as on SIGTERM (safe from any thread)."""
        self.server.should_exit = True
