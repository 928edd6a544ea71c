"""Several worker processes on one port over one cache directory.

The parent binds the listening socket once and forks `workers` children that all accept on
it; it restarts a child that dies and forwards SIGTERM/SIGINT for a graceful stop. A child that
loses its parent is sent SIGTERM by the kernel (PR_SET_PDEATHSIG), so no worker outlives a
crashed supervisor.

Blobs are split between workers by digest (`BlobStore.owns`): the owner alone downloads a blob,
accounts for it against its share of the budget and evicts it. Another worker serves a
complete blob straight from the shared directory, and relays a miss to the owner over the
owner's Unix socket (`<cache-dir>/run/worker-<n>.sock`), so 50 concurrent requests for one blob
spread over every worker still make one upstream download, streamed to all of them as it lands.

`run/` is 0700 and each socket 0600, whatever the umask: a relay is trusted as coming from a
sibling worker (`is_relayed`), so no other local user may connect to one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# Marks a request one worker relays to another, so it is measured and logged once.
RELAY_HEADER: Final = "X-Registry-Proxy-Relay"
PR_SET_PDEATHSIG: Final = 1
# A worker dying faster than this after its start is not restarted in a tight loop.
MIN_RESTART_INTERVAL: Final = 1.0
RUN_DIR_MODE: Final = 0o700
SOCKET_MODE: Final = 0o600


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    run_dir: Path

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.sock"

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"


SINGLE: Final = Worker(0, 1, Path("."))


class OwnerRelay:
    """Sends a request on to the worker that owns the blob, over its Unix socket (which speaks
    TLS too when the mirror serves HTTPS, so `scheme` follows)."""

    def __init__(self, worker: Worker, *, tls: bool = False) -> None:
        self.worker = worker
        self.scheme = "https" if tls else "http"
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def session(self, owner: int) -> aiohttp.ClientSession:
        session = self._sessions.get(owner)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=str(self.worker.socket_path(owner)))
            session = aiohttp.ClientSession(
                connector=connector,
                connector_owner=True,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2),
            )
            self._sessions[owner] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


@contextlib.asynccontextmanager
async def relay_lifecycle(relay: OwnerRelay) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await relay.close()


def relay_socket(path: Path) -> socket.socket:
    """This worker's listening Unix socket for relays from the others, 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode less the umask, so it is
        # never more open than this, not even between bind() and the chmod() below.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        # Listening at once: a bound socket that does not listen yet refuses the other workers'
        # relays, which they would take for a dead owner.
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def is_relayed(request: web.BaseRequest) -> bool:
    """A relay arrives on a worker's Unix socket; a client cannot claim to be one over TCP."""
    if RELAY_HEADER not in request.headers or request.transport is None:
        return False
    return isinstance(request.transport.get_extra_info("sockname"), str)


def supervise(
    count: int,
    run_dir: Path,
    listen: tuple[str, int],
    run_worker: Callable[[Worker, socket.socket], int],
) -> int:
    """Fork `count` workers on one listening socket and keep them running until signalled."""
    sock = socket.create_server(listen, backlog=4096, reuse_port=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(RUN_DIR_MODE, parents=True, exist_ok=True)
    run_dir.mkdir(RUN_DIR_MODE)
    (run_dir / "metrics").mkdir(RUN_DIR_MODE)
    children: dict[int, int] = {}
    started: dict[int, float] = {}
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent()
                code = run_worker(Worker(index, count, run_dir), sock)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
        started[index] = time.monotonic()

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    log.info("supervising %d workers on %s:%d", count, *listen)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        _mark_metrics_dead(run_dir / "metrics", pid)
        if stopping:
            continue
        log.error("worker %d (pid %d) exited with status %d; restarting it", index, pid, status)
        if time.monotonic() - started[index] < MIN_RESTART_INTERVAL:
            time.sleep(MIN_RESTART_INTERVAL)  # a crash loop must not spin the CPU
        start(index)
    sock.close()
    return 0


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _mark_metrics_dead(directory: Path, pid: int) -> None:
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
