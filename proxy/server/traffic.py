"""Bytes served per repository, for the admin API's "top repositories", in bounded memory.

Prometheus labels must have bounded cardinality, so repositories are never a metric label;
this counter lives in memory instead and holds at most `capacity` repositories. It is the
Space-Saving algorithm (Metwally et al., 2005): when a new repository arrives and the table is
full, it takes the place of the smallest one and inherits its count, so every repository that
really served more than total/capacity bytes is in the table, and a count is over by at most
the inherited `error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.server.keys import Notes

DEFAULT_CAPACITY: Final = 1000
COUNTED_ROUTES: Final = frozenset({"manifest", "blob"})


@dataclass(slots=True)
class Served:
    bytes: int
    requests: int
    error: int  # inherited from the evicted entry: an upper bound on the overcount


class RepositoryTraffic:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._served: dict[str, Served] = {}

    def add(self, repository: str, count: int) -> None:
        entry = self._served.get(repository)
        if entry is None:
            entry = Served(0, 0, 0)
            if len(self._served) >= self.capacity:
                smallest = min(self._served, key=lambda name: self._served[name].bytes)
                evicted = self._served.pop(smallest)
                entry = Served(evicted.bytes, evicted.requests, evicted.bytes)
            self._served[repository] = entry
        entry.bytes += count
        entry.requests += 1

    def record(self, noted: Notes, count: int) -> None:
        """Count a finished manifest or blob response (the observe middleware calls this)."""
        if noted.repository is not None and noted.route in COUNTED_ROUTES:
            self.add(noted.repository, count)

    def top(self, limit: int) -> list[tuple[str, Served]]:
        ranked = sorted(self._served.items(), key=lambda item: item[1].bytes, reverse=True)
        return ranked[:limit]
