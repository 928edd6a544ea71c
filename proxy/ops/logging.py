"""Log setup: JSON lines (access log lines carry their fields at the top level) or text.

Every record is handed to one writer thread (`BackgroundHandler`), which formats it and writes
whatever has arrived in one `write`: a line per request costs the event loop only the record
itself, never JSON encoding or a write to stderr that a slow log pipe could block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from typing import Any, ClassVar

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access log lines carry their fields at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def _time(self, record: logging.LogRecord) -> str:
        # strftime is a good part of a line's cost, and lines come many to a second.
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, self.formatTime(record, TIME_FORMAT)
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
        self._start()
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        self.queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put(record)  # formatted by the thread: records are not changed once made

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
                try:
                    lines.append(formatter.format(record) + "\n")
                except Exception:  # one bad record must not stop the log
                    self.handleError(record)
            with contextlib.suppress(OSError, ValueError):  # stderr gone: nobody to tell
                self.target.stream.write("".join(lines))
                self.target.stream.flush()
            if None in batch:
                return

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        super().close()


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
    root.handlers[:] = [BackgroundHandler(handler)]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
