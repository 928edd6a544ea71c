"""Several worker processes on one port over one cache directory.

The parent binds a listening socket per child (SO_REUSEPORT: the kernel spreads connections
over them evenly; on one shared socket, whichever child woke first took most of a burst, up to
61 of `wrk`'s 64) and forks `workers` children, each accepting on its own. It keeps every socket
open, so connections that arrive for a child while it restarts wait in its socket's queue for
the new one. It restarts a child that dies and forwards SIGTERM/SIGINT for a graceful stop. A
child that loses its parent is sent SIGTERM by the kernel (PR_SET_PDEATHSIG), so no worker
outlives a crashed supervisor.

How the workers share the blobs is `proxy.workers.sharding`. `run/` is 0700, whatever the
umask: it holds the workers' sockets and metrics files.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.ops.logging import share_log
from proxy.server import listener

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG: Final = 1
# A worker dying faster than this after its start is not restarted in a tight loop.
MIN_RESTART_INTERVAL: Final = 1.0
RUN_DIR_MODE: Final = 0o700


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


def supervise(
    count: int,
    run_dir: Path,
    listen: tuple[str, int],
    run_worker: Callable[[Worker, list[socket.socket]], int],
) -> int:
    """Fork `count` workers, each on its own listening sockets on `listen`, and keep them running
    until signalled."""
    sockets = listener.bind_shared(*listen, count)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(RUN_DIR_MODE, parents=True, exist_ok=True)
    run_dir.mkdir(RUN_DIR_MODE)
    (run_dir / "metrics").mkdir(RUN_DIR_MODE)
    share_log(run_dir / "log.lock")  # every worker writes to the supervisor's stderr
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
                for other, theirs in enumerate(sockets):
                    if other != index:
                        for sock in theirs:
                            sock.close()
                code = run_worker(Worker(index, count, run_dir), sockets[index])
            finally:
                logging.shutdown()  # the log writer thread writes out what it holds
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
    for sock in itertools.chain.from_iterable(sockets):
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
