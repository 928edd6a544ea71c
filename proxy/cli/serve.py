"""`registry-proxy serve`: run the mirror, as one process or a supervisor of several workers."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Final

from proxy.app import create_app
from proxy.config import DOCKER_HUB_URL, ENV_PREFIX, Settings
from proxy.ops.logging import configure_logging
from proxy.server import listener, runner
from proxy.server.tls import CertificateReloader
from proxy.workers.sharding import relay_socket
from proxy.workers.supervisor import SINGLE, Worker, supervise

PROG = "registry-proxy"


def _size(count: int) -> str:
    """A byte count as the settings write it: 50GiB."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if count % 1024**power == 0:
            return f"{count // 1024**power}{unit}"
    return str(count)


_DEFAULTS: Final = Settings()

# (flag, metavar, help): every value is a string the settings parse (`proxy.config.load`);
# the defaults shown are `Settings`' own.
_FLAGS: Final = (
    ("--listen", "HOST:PORT",
     f"address to serve on (default {_DEFAULTS.listen_host}:{_DEFAULTS.listen_port})"),
    ("--upstream", "URL", f"registry to mirror (default {DOCKER_HUB_URL}, i.e. Docker Hub)"),
    ("--upstream-username", "NAME", "upstream account name"),
    ("--upstream-password-file", "FILE",
     f"file holding the upstream password or token (or set {ENV_PREFIX}UPSTREAM_PASSWORD)"),
    ("--cache-dir", "DIR", f"where cached blobs live (default {_DEFAULTS.cache_dir})"),
    ("--cache-max-size", "SIZE", "hard budget for cached bytes, e.g. 50GiB, 500MB "
     f"(default {_size(_DEFAULTS.cache_max_size)})"),
    ("--log-level", "LEVEL",
     f"debug, info, warning, error or critical (default {_DEFAULTS.log_level})"),
    ("--log-format", "FORMAT", "json (one object per line, the default) or text"),
    ("--metrics-listen", "HOST:PORT",
     "serve /metrics on this address instead of --listen (/healthz and /readyz answer on both)"),
    ("--admin-listen", "HOST:PORT",
     "serve the admin API (cache stats, invalidate, evict, pins) here (default: off)"),
    ("--admin-token-file", "FILE", "bearer token the admin API requires"),
    ("--workers", "N",
     f"worker processes on one port and one cache directory (default {_DEFAULTS.workers})"),
    ("--tls-cert", "FILE", "serve HTTPS with this PEM certificate"),
    ("--tls-key", "FILE", "the PEM private key for --tls-cert"),
    ("--connect-timeout", "SECONDS",
     f"upstream connect timeout (default {_DEFAULTS.connect_timeout:g})"),
    ("--read-timeout", "SECONDS",
     f"upstream read timeout between bytes (default {_DEFAULTS.read_timeout:g})"),
    ("--download-timeout", "SECONDS", "limit for one whole blob download into the cache "
     f"(default {_DEFAULTS.download_timeout:g})"),
)  # fmt: skip


def add_command(commands: Any) -> None:
    """Add `serve` to the `registry-proxy` subcommands."""
    serve = commands.add_parser(
        "serve",
        help="run the mirror",
        description=(
            "Run the mirror. Settings come from --config FILE (TOML), then environment "
            f"variables ({ENV_PREFIX}<SETTING>, e.g. {ENV_PREFIX}CACHE_MAX_SIZE=50GiB), then "
            "these flags; flags win."
        ),
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML settings file (or set {ENV_PREFIX}CONFIG)",
    )
    for flag, metavar, text in _FLAGS:
        serve.add_argument(flag, metavar=metavar, help=text)


def run(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger(PROG).info(
        "serving on %s:%d, mirroring %s, cache %s up to %d bytes",
        settings.listen_host,
        settings.listen_port,
        ", ".join(f"{u.name} ({u.url})" for u in settings.upstreams),
        settings.cache_dir,
        settings.cache_max_size,
    )
    cpus = len(os.sched_getaffinity(0))
    if settings.workers == 1 and cpus > 1:
        # One worker stays the default: a container's CPU limit is not what this process can
        # see, and every worker takes a share of the cache budget. The operator knows both.
        logging.getLogger(PROG).warning(
            "serving with 1 worker process on a machine with %d CPUs: set workers (--workers, "
            "REGISTRY_PROXY_WORKERS) to the CPUs this mirror may use to answer more requests",
            cpus,
        )
    try:
        if settings.workers > 1:
            return supervise(
                settings.workers,
                settings.cache_dir / "run",
                (settings.listen_host, settings.listen_port),
                lambda worker, sockets: run_worker(settings, worker, sockets),
            )
        return run_worker(settings, SINGLE, None)
    except OSError as exc:
        print(f"{PROG}: cannot serve on {settings.listen_host}:{settings.listen_port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1


def run_worker(settings: Settings, worker: Worker, sockets: list[socket.socket] | None) -> int:
    """One serving process: the only one, or worker `worker.index` on its own sockets of the
    port the workers share."""
    app = create_app(settings, worker=worker)
    ssl_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        reloader = CertificateReloader(settings.tls_cert, settings.tls_key)
        app.cleanup_ctx.append(reloader.lifecycle)
        ssl_context = reloader.context
    if sockets is None:
        sockets = listener.bind(settings.listen_host, settings.listen_port)
    else:
        # The supervisor's sockets, plus this worker's own Unix socket for relays from others.
        sockets = [*sockets, relay_socket(worker.socket_path(worker.index))]
    runner.serve(
        app,
        sockets,
        ssl_context=ssl_context,
        shutdown_timeout=30,
        # Passed through to aiohttp's request handler (its HTTP parser limits).
        max_line_size=settings.max_header_size,
        max_field_size=settings.max_header_size,
    )
    return 0
