"""`registry-proxy serve`: run the mirror, as one process or a supervisor of several workers."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from proxy.app import create_app
from proxy.config import ENV_PREFIX, Settings
from proxy.ops.logging import configure_logging
from proxy.server import runner
from proxy.server.tls import CertificateReloader
from proxy.workers.sharding import relay_socket
from proxy.workers.supervisor import SINGLE, Worker, supervise

PROG = "registry-proxy"


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
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="address to serve on (default 0.0.0.0:5000)"
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="registry to mirror (default https://registry-1.docker.io, i.e. Docker Hub)",
    )
    serve.add_argument("--upstream-username", metavar="NAME", help="upstream account name")
    serve.add_argument(
        "--upstream-password-file",
        metavar="FILE",
        help=f"file holding the upstream password or token (or set {ENV_PREFIX}UPSTREAM_PASSWORD)",
    )
    serve.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where cached blobs live (default /var/cache/registry-proxy)",
    )
    serve.add_argument(
        "--cache-max-size",
        metavar="SIZE",
        help="hard budget for cached bytes, e.g. 50GiB, 500MB (default 50GiB)",
    )
    serve.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default info)",
    )
    serve.add_argument(
        "--log-format",
        metavar="FORMAT",
        help="json (one object per line, the default) or text",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=(
            "serve /metrics on this address instead of --listen "
            "(/healthz and /readyz answer on both)"
        ),
    )
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve the admin API (cache stats, invalidate, evict, pins) here (default: off)",
    )
    serve.add_argument(
        "--admin-token-file", metavar="FILE", help="bearer token the admin API requires"
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="worker processes on one port and one cache directory (default 1)",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate")
    serve.add_argument("--tls-key", metavar="FILE", help="the PEM private key for --tls-cert")
    serve.add_argument(
        "--connect-timeout", metavar="SECONDS", help="upstream connect timeout (default 5)"
    )
    serve.add_argument(
        "--read-timeout",
        metavar="SECONDS",
        help="upstream read timeout between bytes (default 60)",
    )
    serve.add_argument(
        "--download-timeout",
        metavar="SECONDS",
        help="limit for one whole blob download into the cache (default 3600)",
    )


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
    if settings.workers > 1:
        try:
            return supervise(
                settings.workers,
                settings.cache_dir / "run",
                (settings.listen_host, settings.listen_port),
                lambda worker, sock: run_worker(settings, worker, sock),
            )
        except OSError as exc:
            print(f"{PROG}: cannot serve on {settings.listen_host}:{settings.listen_port}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 1
    try:
        return run_worker(settings, SINGLE, None)
    except OSError as exc:
        print(f"{PROG}: cannot serve on {settings.listen_host}:{settings.listen_port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1


def run_worker(settings: Settings, worker: Worker, sock: socket.socket | None) -> int:
    """One serving process: the only one, or worker `worker.index` on a shared socket."""
    app = create_app(settings, worker=worker)
    ssl_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        reloader = CertificateReloader(settings.tls_cert, settings.tls_key)
        app.cleanup_ctx.append(reloader.lifecycle)
        ssl_context = reloader.context
    where: dict[str, Any] = {"host": settings.listen_host, "port": settings.listen_port}
    if sock is not None:
        # The supervisor's socket, plus this worker's own Unix socket for relays from others.
        where = {"sockets": [sock, relay_socket(worker.socket_path(worker.index))]}
    runner.serve(
        app,
        **where,
        ssl_context=ssl_context,
        shutdown_timeout=30,
        # Passed through to aiohttp's request handler (its HTTP parser limits).
        max_line_size=settings.max_header_size,
        max_field_size=settings.max_header_size,
    )
    return 0
