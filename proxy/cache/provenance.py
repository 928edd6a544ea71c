"""Where cached content came from, and who may be served it from the cache.

Content is stored once per digest, whatever repository it was pulled through, but who may read
it depends on the repository: a layer of a private image must not be served through a public
repository by someone who learnt its digest (digests show in pod status, pinned manifests and
CI logs). So the mirror records, per digest, the `(upstream, repository)` pairs it was seen in:
fetched from, or confirmed present by that upstream. A digest seen in a public repository stays
shared with everyone who may pull that repository.

The record persists beside the blobs, in `<cache-dir>/provenance.sqlite` (WAL, so the workers of
one host share it)::

    seen(digest, upstream, repository)   one row per pair, never more than the upstreams confirmed

Only cached content needs a record (what is not cached is fetched through the repository asked
for, which is its own check): a digest's rows go when it is evicted, and those of digests no
longer in the cache when the first worker starts, so the file stays in proportion to the
cache. A row lost to a race (a digest evicted while fetched again) only costs one more question
to the upstream.

Who may be served what from this record is `proxy.server.guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

from proxy.errors import RegistryError
from proxy.oci import Digest

log = logging.getLogger(__name__)

FILE_NAME: Final = "provenance.sqlite"
# Pairs known to be recorded, kept in memory so a hit costs no query; cleared when this large.
MEMORY_LIMIT: Final = 1_000_000

# How long a connection waits for another process's lock, and between tries to open the file.
BUSY_TIMEOUT: Final = 5.0
OPEN_RETRY_SECONDS: Final = 0.01

Pair = tuple[str, str]  # (upstream name, repository name)


class Provenance:
    """The `(upstream, repository)` pairs each digest was seen in, persisted in SQLite.

    Reads run on the event loop (a WAL reader never waits for a writer); writes go to a thread.
    A cache directory that cannot hold the file (read-only) leaves the record in memory only.
    """

    def __init__(self, cache_dir: Path | None) -> None:
        self.path = cache_dir / FILE_NAME if cache_dir is not None else None
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._memory: dict[str, set[Pair]] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self._size = 0

    def open(self) -> None:
        if self.path is None:
            return
        # Workers open the file at the same moment: switching a new file to WAL, SQLite answers
        # "locked" at once rather than through its busy timeout, so that is waited out here.
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                self.close()
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    log.warning("provenance kept in memory only: cannot use %s: %s", self.path, exc)
                    return
                time.sleep(OPEN_RETRY_SECONDS)
            except sqlite3.Error as exc:
                log.warning("provenance kept in memory only: cannot use %s: %s", self.path, exc)
                self.close()
                return

    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute(
            "CREATE TABLE IF NOT EXISTS seen (digest TEXT, upstream TEXT, repository TEXT,"
            " PRIMARY KEY (digest, upstream, repository)) WITHOUT ROWID"
        )
        self._writer.commit()
        self._reader = self._connect()

    @property
    def persistent(self) -> bool:
        """Whether pairs go to the file (else they are kept in memory only)."""
        return self._writer is not None

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def close(self) -> None:
        with self._write_lock:  # an insert still running in its thread finishes first
            for connection in (self._reader, self._writer):
                if connection is not None:
                    connection.close()
            self._reader = self._writer = None

    def pairs(self, digest: Digest) -> set[Pair]:
        key = str(digest)
        found = set(self._memory.get(key, ()))
        if self._reader is not None:
            try:
                rows = self._reader.execute(
                    "SELECT upstream, repository FROM seen WHERE digest = ?", (key,)
                ).fetchall()
            except sqlite3.Error as exc:
                log.warning("provenance lookup failed: %s", exc)
                rows = []
            found.update((str(upstream), str(repository)) for upstream, repository in rows)
        return found

    def seen_in(self, digest: Digest, upstream: str, repository: str) -> bool:
        if (upstream, repository) in self._memory.get(str(digest), ()):
            return True
        if (upstream, repository) in self.pairs(digest):
            self._remember(str(digest), (upstream, repository))
            return True
        return False

    def record(self, digest: Digest, upstream: str, repository: str) -> None:
        """Remember the pair now; persist it in a thread the request does not wait for (it may
        be answered, or its client gone, before the row is written)."""
        key, pair = str(digest), (upstream, repository)
        if pair in self._memory.get(key, ()):
            return
        self._remember(key, pair)
        if self._writer is not None:
            self._in_thread(self._insert, key, pair)

    def _insert(self, digest: str, pair: Pair) -> None:
        with self._write_lock:
            if self._writer is None:
                return
            try:
                self._writer.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (digest, *pair))
                self._writer.commit()
            except sqlite3.Error as exc:
                log.warning("provenance not persisted: %s", exc)

    def forget(self, digest: Digest) -> None:
        """Drop what was recorded of `digest` (evicted); the row goes in a thread."""
        key = str(digest)
        self._size -= len(self._memory.pop(key, ()))
        if self._writer is not None:
            self._in_thread(self._delete, [key])

    def _in_thread(self, write: Callable[..., None], *args: Any) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, write, *args)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)

    async def idle(self) -> None:
        """Wait for the writes under way (before `close`, which would drop those not begun)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def prune(self, cached: Callable[[Digest], bool]) -> int:
        """Drop the rows of every digest not `cached` (evicted before a crash, or by an older
        release); blocking, for a thread. Returns how many digests went."""
        if self._writer is None:
            return 0
        try:
            # A connection of its own: the reader's serves lookups on the event loop meanwhile.
            connection = self._connect()
            try:
                rows = connection.execute("SELECT DISTINCT digest FROM seen").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as exc:
            log.warning("provenance not pruned: %s", exc)
            return 0
        gone = []
        for (key,) in rows:
            try:
                digest = Digest.parse(str(key))
            except RegistryError:
                gone.append(str(key))
                continue
            if not cached(digest):
                gone.append(str(key))
        self._delete(gone)
        if gone:
            log.info("provenance: forgot %d digests no longer cached", len(gone))
        return len(gone)

    @contextlib.asynccontextmanager
    async def pruning(self, cached: Callable[[Digest], bool]) -> AsyncIterator[None]:
        """`prune` in a thread while the block runs (the mirror serves meanwhile)."""
        task = asyncio.create_task(asyncio.to_thread(self.prune, cached))
        try:
            yield
        finally:
            await task

    def _delete(self, digests: list[str]) -> None:
        with self._write_lock:
            if self._writer is None or not digests:
                return
            try:
                rows = [(digest,) for digest in digests]
                self._writer.executemany("DELETE FROM seen WHERE digest = ?", rows)
                self._writer.commit()
            except sqlite3.Error as exc:
                log.warning("provenance not pruned: %s", exc)

    def _remember(self, digest: str, pair: Pair) -> None:
        if self._size >= MEMORY_LIMIT:
            self._memory.clear()
            self._size = 0
        self._memory.setdefault(digest, set()).add(pair)
        self._size += 1
