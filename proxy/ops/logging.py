"""Log setup: JSON lines (access log lines carry their fields at the top level) or text.

Every record is handed to one writer thread (`BackgroundHandler`), which formats it and writes
whatever has arrived in one `write`: a slow log pipe never blocks the event loop. Several
workers share stderr, in a container a pipe, where the kernel keeps only writes of up to
PIPE_BUF bytes whole: each process's batches then go out under a lock they share
(`share_log`), so that no line is cut in two by another process's write. The access log,
a line per request, skips the record when the format is JSON and no other handler is in the way
(`direct_lines`): the request's values are kept, its line is made with the others of its batch
on the event loop, and only written by the thread, which then holds the interpreter lock for
almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access log lines carry their fields at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._head_key: tuple[int, int, str] | None = None
        self._head = ""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            return self.access_line(record.created, record.levelname, record.name, access)
        entry: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def access_line(self, created: float, level: str, logger: str, fields: dict[str, Any]) -> str:
        """An access log line: the usual three fields, then the request's own."""
        head = {"time": self._time(created), "level": level.lower(), "logger": logger}
        return json.dumps(head | fields, default=str)

    def line_head(self, created: float, level: int, logger: str) -> str:
        """An access line up to its own members: `{"time": ..., "level": ..., "logger": ...`,
        the same for every line of a second."""
        key = (int(created), level, logger)
        if key != self._head_key:
            entry = {"time": self._time(created), "level": logging.getLevelName(level).lower()}
            self._head = json.dumps(entry | {"logger": logger})[:-1]
            self._head_key = key
        return self._head

    def _time(self, created: float) -> str:
        # strftime is a good part of a line's cost, and lines come many to a second.
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(TIME_FORMAT, self.converter(created))
            self._second = second
        return self._stamp


class BackgroundHandler(logging.Handler):
    """Queues records for a thread that formats them and writes them in batches.

    The thread writes every line that arrived within `BATCH_SECONDS` of the first in one call.
    `close` (run by `logging.shutdown` at exit, and by a worker before it ends) writes out what
    is queued; a forked worker starts a thread of its own (the parent's does not survive a
    fork, and what it had queued is the parent's to write).
    """

    BATCH_SECONDS: ClassVar[float] = 0.01

    def __init__(self, target: logging.StreamHandler[Any]) -> None:
        super().__init__()
        self.target = target
        # Lines held elsewhere (DirectLines), to go out before a record and at close.
        self.before_record: Callable[[], None] | None = None
        self.lock_path: Path | None = None  # see `share`
        self._lock_fd = -1
        self._start()
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        self.queue: queue.SimpleQueue[logging.LogRecord | str | None] = queue.SimpleQueue()
        # The lock file, opened by each process itself: a descriptor inherited over a fork
        # shares its lock with the parent's, which would exclude nothing.
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self.thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self.thread.start()

    def share(self, lock_path: Path) -> None:
        """Other processes write the same stream: write each batch holding `lock_path`'s
        flock (a process that dies holding it lets it go)."""
        self.lock_path = lock_path

    def _out(self, text: str) -> None:
        if self.lock_path is not None and self._lock_fd < 0:
            with contextlib.suppress(OSError):  # unlocked rather than not written at all
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                self._lock_fd = os.open(self.lock_path, flags, 0o600)
        locked = self._lock_fd >= 0
        if locked:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self.target.stream.write(text)
            self.target.stream.flush()
        finally:
            if locked:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def emit(self, record: logging.LogRecord) -> None:
        if self.before_record is not None:
            self.before_record()
        self.queue.put(record)  # formatted by the thread: records are not changed once made

    def emit_line(self, line: str) -> None:
        """A line formatted already (with its newline), written in turn with the records."""
        self.queue.put(line)

    def _write(self) -> None:
        formatter = self.target.formatter or logging.Formatter()
        while True:
            batch = [self.queue.get()]
            time.sleep(self.BATCH_SECONDS)
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.queue.get_nowait())
            lines = []
            for record in batch:
                if record is None:
                    break
                if isinstance(record, str):
                    lines.append(record)
                    continue
                try:
                    lines.append(formatter.format(record) + "\n")
                except Exception:  # one bad record must not stop the log
                    self.handleError(record)
            with contextlib.suppress(OSError, ValueError):  # stderr gone: nobody to tell
                self._out("".join(lines))
            if None in batch:
                return

    def close(self) -> None:
        if self.before_record is not None:
            self.before_record()
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        super().close()


class DirectLines:
    """Access log lines made without records, on the event loop, a batch at a time: a line's
    values are kept as they come, and what one loop gathered within
    `BackgroundHandler.BATCH_SECONDS` is made into text in one pass (a fraction of making each
    line as its request ends: the same code and tables stay hot for the whole batch) and handed
    to the writer thread in one piece (the thread wakes once a batch, not once a line). A
    record logged meanwhile, or the log closing, hands them over first, so lines stay in
    order."""

    def __init__(self, handler: BackgroundHandler, formatter: JsonFormatter) -> None:
        self.handler = handler
        self.formatter = formatter
        self._pending: list[tuple[float, int, str, str, str, float, str]] = []
        self._lock = threading.Lock()  # records may come from other threads
        handler.before_record = self.flush

    def write(
        self, level: int, logger: str, first: str, before: str, number: float, after: str
    ) -> None:
        """A line of `logger` at `level` whose own members (after time, level and logger) are
        `first` and `before`, `number` with three decimals, then `after`: JSON text, `"name":
        value` pairs joined by `, `, as `json.dumps` writes them (an access line: its remote
        address, then what repeats from request to request around its duration)."""
        with self._lock:
            pending = self._pending
            pending.append((time.time(), level, logger, first, before, number, after))
            opened = len(pending) == 1
        if opened:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to wait on: now
                self.flush()
                return
            loop.call_later(self.handler.BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            head = self.formatter.line_head
            text = "".join(
                [f"{head(created, level, logger)}, {first}{before}{number:.3f}{after}}}\n"
                 for created, level, logger, first, before, number, after in pending]
            )  # fmt: skip
            self.handler.emit_line(text)


_direct: DirectLines | None = None


def direct_lines(logger: logging.Logger) -> DirectLines | None:
    """Where `logger`'s lines may go as text: only while the log is ours (`configure_logging`,
    JSON) and no handler was added on `logger` itself (as tests do to collect records)."""
    if _direct is None or logger.handlers or _direct.handler not in logging.root.handlers:
        return None
    return _direct


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BackgroundHandler):
            previous.close()  # its thread writes out what it holds, then ends
    background = BackgroundHandler(handler)
    root.handlers[:] = [background]
    global _direct
    formatter = handler.formatter
    _direct = DirectLines(background, formatter) if isinstance(formatter, JsonFormatter) else None
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def share_log(lock_path: Path) -> None:
    """This process and those it forks write one stream (workers sharing stderr): batches go
    out under `lock_path`'s lock, one process at a time."""
    for handler in logging.root.handlers:
        if isinstance(handler, BackgroundHandler):
            handler.share(lock_path)
