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

from aiohttp import web

from proxy.errors import RegistryError
from proxy.oci import BlobPath, ManifestPath, parse_api_path
from proxy.server.keys import ROUTE, UPSTREAM

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

    def record(self, request: web.Request, count: int) -> None:
        """Count a finished manifest or blob response (the observe middleware calls this)."""
        if request.get(ROUTE) not in COUNTED_ROUTES or UPSTREAM not in request:
            return
        upstream = request[UPSTREAM]
        tail = request.rel_url.raw_path.removeprefix("/v2/")
        if "ns" not in request.query:
            tail = tail.removeprefix(f"{upstream}/")
        try:
            api = parse_api_path(tail)
        except RegistryError:
            return
        if isinstance(api, ManifestPath | BlobPath):
            self.add(f"{upstream}/{api.repository.name}", count)

    def top(self, limit: int) -> list[tuple[str, Served]]:
        ranked = sorted(self._served.items(), key=lambda item: item[1].bytes, reverse=True)
        return ranked[:limit]
