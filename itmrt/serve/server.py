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
returns (the process exits 0) - within ``grace_s`` seconds whatever the clients
do: clients that do not read their answers are cut off by the write deadline
(:mod:`itmrt.serve.transport`), and past ``grace_s`` the process exits 1 with
one log line. A gallery that cannot be loaded stops the service and ``run``
raises :class:`ItmrtError` with the reason. SIGHUP, a change in the gallery
folder, or the repository load endpoint swap in what is on disk
(:mod:`itmrt.serve.swap`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmrt.bundle.names import BackendName, Precision, parse_choice
from itmrt.errors import ItmrtError
from itmrt.limits import MAX_BATCH, MAX_COPY_MB, MAX_COUNT, MAX_MEMORY_MB, check_real, store_count
from itmrt.optional import require, require_all
from itmrt.runtime.options import OnLong, RuntimeOptions, ScorerChoice
from itmrt.scale.layout import is_sharded_gallery
from itmrt.serve.auth import read_token_file, token_file_exposure
from itmrt.serve.batcher import Batcher, BatchSettings
from itmrt.serve.guard import BrowserPolicy
from itmrt.serve.http_app import HttpLimits, create_app
from itmrt.serve.memory import fixed_mmap_threshold
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.quiet import CLIENT_LOG, client_warnings_throttled
from itmrt.serve.searcher import Searcher
from itmrt.serve.swap import Reloader, RuntimeSource
from itmrt.serve.transport import guarded_protocol

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
    regions: dict[str, Any] = field(default_factory=dict)  # sharded galleries: SearchRequest's region fields given
    ray: Any = None  # sharded galleries: itmrt.scale.RayOptions to search the shards on Ray actors
    copy_shards_mb: float = 1024.0  # sharded galleries in this process: copied into memory when they fit this
    configure_logging: bool = True  # False: leave logging as the embedding application set it up
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones (itmrt.serve.guard)
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the service (CORS)
    grace_s: float = 20.0  # SIGTERM: the process is gone within this many seconds
    watch_s: float = 1.0  # model_control poll: how often the gallery folder is checked for a new version
    model_control: str = "poll"  # poll | explicit (the repository load/unload endpoints) | none; SIGHUP: any
    caller_header: str | None = None  # a header naming the caller for the fair queue (set by a trusted proxy)
    # The runtime options as one group (what `itmrt serve`'s runtime flags build), instead of the fields backend
    # .. on_long above, which are then set from it; its on_long is the service's (refuse: 400).
    runtime: RuntimeOptions | None = None

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL:
            raise ItmrtError(f"--model-control must be one of {', '.join(MODEL_CONTROL)}, not {self.model_control!r}")
        self._check_service_fields()
        if self.runtime is not None:
            _runtime_fields_from(self, self.runtime)
            return
        # Plain strings are accepted and checked here, once, with the choices in the message.
        object.__setattr__(self, "backend", parse_choice(BackendName, self.backend, "backend"))
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "precision"))
        object.__setattr__(self, "scorer", parse_choice(ScorerChoice, self.scorer, "scorer"))
        object.__setattr__(self, "on_long", parse_choice(OnLong, self.on_long, "--on-long"))
        store_count(self, "memory_mb", 1, MAX_MEMORY_MB, "--memory-mb")

    def _check_service_fields(self) -> None:
        """The fields the CLI bounds, bounded alike for the Python API: a string or a number out of range failed
        in a comparison, a shift or bind() (a TypeError, or OverflowError: "port must be 0-65535")."""
        if not isinstance(self.host, str) or not self.host.strip():
            raise ItmrtError(f"--host must be an address (e.g. 127.0.0.1 or 0.0.0.0), not {self.host!r}")
        # a NumPy integer is taken, and stored as an int (bind() and the JSON of /v2 take Python's)
        store_count(self, "port", 0, 65535, "--port")
        store_count(self, "max_connections", 1, MAX_BATCH, "--max-connections")
        if self.shortlist is not None:
            store_count(self, "shortlist", 1, MAX_COUNT, "--shortlist")
        check_real(self.copy_shards_mb, 0.0, MAX_COPY_MB, "--copy-shards-mb")
        check_real(self.grace_s, 1.0, 3600.0, "--grace-s")
        check_real(self.watch_s, 0.0, 3600.0, "--watch-s")
        _check_region_names(self.regions)
        if self.ray is not None:  # a string reached the first search as a missing attribute
            from itmrt.scale.open_gallery import check_open_options

            check_open_options(self.ray, True, self.copy_shards_mb)

    def runtime_options(self) -> RuntimeOptions:
        """The runtime group the service loads its bundle with (``runtime``, or the one its fields make)."""
        if self.runtime is not None:
            return self.runtime
        return RuntimeOptions(backend=self.backend, precision=self.precision, providers=self.providers,
                              threads=self.threads, scorer=self.scorer, budget_bytes=self.memory_mb << 20,
                              on_long=self.on_long)


def _check_region_names(regions: object) -> None:
    """``regions``: a dict of :class:`itmrt.scale.SearchRequest`'s region fields (a string, or an unknown name,
    failed as a TypeError where the sharded gallery was opened)."""
    from itmrt.scale.shard import REGION_OPTIONS

    unknown = sorted(str(name) for name in regions if name not in REGION_OPTIONS) \
        if isinstance(regions, dict) else None
    if unknown is None or unknown:
        raise ItmrtError(f"regions must be a dict of the region index's search options ({', '.join(REGION_OPTIONS)})"
                         f", not {regions!r}" + (f": {', '.join(unknown)} is not one" if unknown else ""))


MODEL_CONTROL = ("none", "poll", "explicit")
"""What may swap in a new gallery version (as Triton's --model-control-mode): nothing, a changed folder, or the
repository load/unload endpoints. SIGHUP, which only whoever runs the process can send, reloads in every mode."""

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


def _sharded_source(gallery: Path, options: ServeOptions, load_options: dict[str, Any]) -> RuntimeSource:
    """Where a sharded gallery lives and how to open it (its shards in this process, or on Ray with
    ``options.ray``), checked enough to refuse a missing or broken gallery before the port is taken."""
    from itmrt.scale.layout import read_sharded_gallery
    from itmrt.serve.sharded import ShardedSource

    sharded = read_sharded_gallery(gallery)
    if options.shortlist is not None and options.shortlist < 1:
        raise ItmrtError(f"--shortlist must be at least 1, not {options.shortlist}")
    if options.regions:
        from itmrt.scale.shard import SearchRequest, check_region_options, require_shortlist

        require_shortlist(options.regions, options.shortlist)
        check_region_options(SearchRequest(k=1, shortlist=options.shortlist, **options.regions).check(), sharded)
    return ShardedSource(gallery, load_options, options.on_long, CLIENT_LOG.warning, options.ray, options.shortlist,
                         options.copy_shards_mb, options.regions)


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


@contextlib.contextmanager
def _reload_on_sighup(reloader: Reloader | None) -> Iterator[None]:
    """SIGHUP swaps in the gallery on disk (main thread only, where signals are delivered)."""
    if reloader is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        yield
        return
    previous = signal.signal(signal.SIGHUP, lambda _signum, _frame: reloader.reload("SIGHUP"))
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def _server_with_deadline(uvicorn: Any, config: Any, grace_s: float) -> Any:
    """uvicorn's server, whose first SIGINT/SIGTERM also starts a clock: past ``grace_s`` the process exits 1
    (unless ``server.finished`` is set first: ``run`` returned, the application goes on)."""

    class DeadlineServer(uvicorn.Server):  # type: ignore[misc, name-defined]
        finished = threading.Event()

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                threading.Thread(target=_exit_after, args=(grace_s, self.finished), name="itmrt-serve-grace",
                                 daemon=True).start()
            super().handle_exit(sig, frame)

    server = DeadlineServer(config)
    server.finished = threading.Event()
    return server


def _exit_after(grace_s: float, finished: threading.Event) -> None:
    if finished.wait(grace_s):
        return
    log.error("the grace period of %g s is over with answers still going out; exiting now", grace_s)
    logging.shutdown()
    os._exit(1)


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
        self.source: RuntimeSource | None = None
        if searcher is None:
            searcher = self._runtime_searcher(source, gallery, options)
        token = read_token_file(options.token_file) if options.token_file is not None else None
        self.metrics = ServiceMetrics()
        self.batcher = Batcher(searcher, options.batch, self.metrics, on_failure=lambda _reason: self.stop())
        watch_s = options.watch_s if options.model_control == "poll" else 0.0
        self.reloader = Reloader(self.source, self.batcher, self.metrics, watch_s) if self.source else None
        self.socket = bind_socket(options.host, options.port)
        self.host, self.port = self.socket.getsockname()[:2]
        policy = BrowserPolicy(tuple(h.lower() for h in options.allowed_hosts), options.cors_origins, str(self.host))
        # SIGTERM: uvicorn waits for answers in flight, then the worker gets what is left of the grace period.
        drain_s, answers_s = 1.0, max(options.grace_s - 2.0, 0.5)
        self.app = create_app(self.batcher, self.metrics, options.limits, token, policy, self.reloader, drain_s,
                              options.model_control, options.caller_header)
        limits = options.limits
        config = uvicorn.Config(
            self.app,
            http=guarded_protocol(limits.header_timeout_s, limits.write_timeout_s, options.max_connections,
                                  self.metrics),
            log_config=_log_config() if options.configure_logging else None,
            access_log=options.access_log,
            lifespan="on",
            timeout_keep_alive=max(1, round(limits.keep_alive_s)),
            timeout_graceful_shutdown=max(1, int(answers_s)),
        )
        self.server = _server_with_deadline(uvicorn, config, options.grace_s)

    def _runtime_searcher(self, source: Any, gallery: Any, options: ServeOptions) -> Callable[[], Searcher]:
        from itmrt.bundle.folder import read_bundle
        from itmrt.runtime.gallery import gallery_source, is_gallery, read_gallery

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
            self.source = _sharded_source(gallery_path, options, load_options)
        elif options.ray is not None or options.shortlist is not None or options.regions:
            raise ItmrtError("--ray, --shortlist and the region-index flags search a sharded gallery; make one with "
                             "`itmrt index ... "
                             "--shard-images N`")
        else:
            # A missing or broken gallery, or one another image encoder made, is reported before the port is taken.
            read_gallery(gallery_path).check_bundle(read_bundle(bundle_path))
            explicit = None if is_gallery(source) else bundle_path
            self.source = RuntimeSource(gallery_path, explicit, load_options, options.on_long, CLIENT_LOG.warning)
        opener = self.source
        return lambda: opener.open(None)[0]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM or :meth:`stop`; raise :class:`ItmrtError` if the gallery failed to load."""
        log.info("listening on %s; loading the gallery", self.url)
        if self.options.token_file is None and not _loopback(str(self.host)):
            log.warning("listening on %s without --token-file: anyone who can reach it can query it", self.host)
        if not _loopback(str(self.host)) and not self.options.allowed_hosts:
            log.warning("listening on %s, but only loopback Host names are answered; name the ones clients use "
                        "with --allowed-hosts", self.host)
        if self.options.token_file is not None and (exposed := token_file_exposure(self.options.token_file)):
            log.warning("%s", exposed)
        fixed_mmap_threshold()  # large bodies and answers go back to the system when freed (itmrt.serve.memory)
        if self.reloader is not None:
            self.reloader.start()
        # A client can cause warnings (malformed requests, unknown words): each kind at most once a minute.
        with _exit_zero_after_signal(), _reload_on_sighup(self.reloader), client_warnings_throttled():
            try:
                self.server.run(sockets=[self.socket])
            finally:
                self.server.finished.set()
        if self.reloader is not None:
            self.reloader.stop()
        self.socket.close()
        if self.batcher.failure is not None:
            raise ItmrtError(f"the service stopped: {self.batcher.failure}")

    def stop(self) -> None:
        """Ask the server to stop as on SIGTERM (safe from any thread)."""
        self.server.should_exit = True
