"""The in-memory index of complete blobs, least recently used first, rebuilt from disk at start."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.oci import Digest


@dataclass(slots=True)
class Entry:
    size: int
    touched: float  # last use, wall-clock: the file's mtime survives a restart
    # Hashed by this process: at download, or on the first read after a start (the file may have
    # changed on disk while the mirror was down).
    verified: bool = False


class Index:
    """Complete blobs this store accounts for, in order of use, and their total size."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Digest, Entry] = OrderedDict()
        self.size = 0

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Digest]:
        """Least recently used first."""
        return iter(list(self._entries))

    def get(self, digest: Digest) -> Entry | None:
        return self._entries.get(digest)

    def items(self) -> list[tuple[Digest, Entry]]:
        return list(self._entries.items())

    def add(self, digest: Digest, entry: Entry) -> None:
        if digest in self._entries:
            return
        self._entries[digest] = entry
        self.size += entry.size

    def used(self, digest: Digest) -> None:
        """Now the most recently used."""
        self._entries.move_to_end(digest)

    def drop(self, digest: Digest) -> Entry | None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.size -= entry.size
        return entry
