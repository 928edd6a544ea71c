"""Where the cache keeps what, on disk: the one drawing of the tree, and the file helpers that
keep its promises (private modes, no symlink followed, no partial file under `blobs/`).

Layout under the cache directory::

    <cache-dir>/
    +-- blobs/
    |   +-- sha256/
    |       +-- ab/
    |           +-- abcdef0123...       complete and verified; the name is the hex digest
    +-- tmp/
    |   +-- sha256-abcdef0123...        a download in progress, flock()ed by its writer
    |   +-- sha256-abcdef0123....N.small  a manifest being written (renamed at once)
    |   +-- evicted-<pid>-<n>           a blob being deleted, off the loop
    |   +-- .ready-XXXXXXXX             readiness's write probe, gone within milliseconds
    +-- run/                            with --workers: Unix sockets, metrics files (proxy.workers)
    +-- provenance.sqlite(-wal, -shm, -journal)  where each digest was seen (proxy.cache.provenance)

Directories are created 0700 and files 0600 (cached images may be private; other local users
have no business reading them), whatever the umask; start-up tightens `blobs/` and `tmp/` left
0755 by older releases, which keeps their 0644 files out of reach. Files are created with
O_EXCL | O_NOFOLLOW, so nothing planted in `tmp/` is followed or reused.

Directories are created 0700 and files 0600 (cached images may be private; other local users
have no business reading them), whatever the umask; start-up tightens `blobs/` and `tmp/` left
0755 by older releases, which keeps their 0644 files out of reach. Files are created with
O_EXCL | O_NOFOLLOW, so nothing planted in `tmp/` is followed or reused. A temporary file's
name and its flock are the coordination point between processes sharing the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Final

from proxy.errors import RegistryError
from proxy.oci import Digest

log = logging.getLogger(__name__)

READ_CHUNK: Final = 1024 * 1024
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
# A new file of our own: never through a symlink, never one that already exists.
CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Layout:
    """The paths of one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.temp_dir = root / "tmp"

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.encoded[:2] / digest.encoded

    def temp_path(self, digest: Digest) -> Path:
        """A download in progress, flock()ed by its writer."""
        return self.temp_dir / f"{digest.algorithm}-{digest.encoded}"

    def small_temp_path(self, digest: Digest) -> Path:
        """A manifest being written by this process (renamed into place at once)."""
        return self.temp_dir / f"{digest.algorithm}-{digest.encoded}.{os.getpid()}.small"

    def trash_path(self, number: int) -> Path:
        """A blob being deleted, off the event loop."""
        return self.temp_dir / f"evicted-{os.getpid()}-{number}"

    def make_shard_dir(self, digest: Digest) -> None:
        """Create the directories a blob is renamed into, 0700 each."""
        algorithm = self.blobs_dir / digest.algorithm
        for directory in (algorithm, algorithm / digest.encoded[:2]):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, DIR_MODE)

    def create(self) -> None:
        """The root and its two directories, private (see the module docstring)."""
        self.root.mkdir(DIR_MODE, parents=True, exist_ok=True)
        for directory in (self.blobs_dir, self.temp_dir):
            private_dir(directory)

    def scan(self) -> dict[Digest, tuple[int, float]]:
        """Every complete blob on disk: (size, mtime). Stray files are logged and skipped."""
        found: dict[Digest, tuple[int, float]] = {}
        for algorithm_dir in subdirs(self.blobs_dir):
            for shard in subdirs(Path(algorithm_dir.path)):
                with os.scandir(shard.path) as files:
                    for file in files:
                        try:
                            digest = Digest.parse(f"{algorithm_dir.name}:{file.name}")
                            stat = file.stat(follow_symlinks=False)
                        except (RegistryError, OSError):
                            log.warning("ignoring stray file in cache: %s", file.path)
                            continue
                        if shard.name == digest.encoded[:2] and file.is_file():
                            found[digest] = (stat.st_size, stat.st_mtime)
        return found

    def temp_digest(self, name: str) -> Digest | None:
        """The digest a temporary file's name is for, if any."""
        algorithm, _, encoded = name.partition("-")
        try:
            return Digest.parse(f"{algorithm}:{encoded}")
        except RegistryError:
            return None


def hashes_to(path: Path, digest: Digest) -> bool:
    hasher = digest.hasher()
    try:
        with path.open("rb") as file:
            while chunk := file.read(READ_CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return bool(hasher.hexdigest() == digest.encoded)


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (0600, exclusively, no symlink followed) holding `data`."""
    fd = os.open(path, os.O_WRONLY | CREATE_FLAGS, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def private_dir(path: Path) -> None:
    """Create `path` 0700, or make it so if it exists (older releases left 0755)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if os.stat(path).st_mode & 0o777 != DIR_MODE:
            try:
                os.chmod(path, DIR_MODE)
            except PermissionError as exc:
                log.warning("cannot make %s private (mode 0700): %s", path, exc)


def remove_unlocked(path: Path) -> bool:
    """Remove a temporary file nobody holds the flock of (a symlink, whatever it points to);
    False if someone holds it. Unlinked under our lock, so never a file created after the check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)  # a symlink: not ours to follow
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)
    return True


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def subdirs(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []
