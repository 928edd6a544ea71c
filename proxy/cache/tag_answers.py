"""What the upstream answered for a tag, as values: which manifest each client gets, and 404s.

What a tag resolves to depends on the set of manifest types a client admits
(`oci.manifest_types`), never on how its Accept header is spelled: an index to a client that
accepts indexes, a single-platform manifest (or a 404) to one that does not. A tag's entry
keeps what the upstream answered, one manifest per media type, and each request picks the one
its client admits (`TagAnswers.choose`), so a tag resolved by one client (or `warm`) answers
every other, above all while the upstream is down. A 404 is remembered for the set it was the
answer to (`Misses`): one old client cannot make a tag vanish for the others. Where these are
stored: `proxy.cache.tags`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from proxy.errors import RegistryError
from proxy.oci import Digest, MediaType


@dataclass(frozen=True, slots=True)
class Resolution:
    digest: str
    media_type: str
    size: int
    checked: float  # wall-clock time of the last upstream confirmation, shared across replicas
    # The index types admitted by the Accept sets this manifest was the upstream's answer to.
    # An image manifest given to a client that accepts an index type proves the tag is no
    # index of that type; given only to clients without indexes it may be one platform's
    # manifest picked out of an index, which a client taking indexes must never receive.
    indexes: tuple[str, ...] = ()

    def answers(self, types: frozenset[str]) -> bool:
        """Whether the upstream, asked with these manifest types, gives this manifest."""
        if self.media_type not in types:
            return False
        return self.media_type in MediaType.INDEXES or types & MediaType.INDEXES <= set(
            self.indexes
        )


def _rank(media_type: str) -> int:
    """Registries answer a tag with its index when the client takes it (OCI distribution
    spec, "Pulling manifests"), so an index outranks any image manifest."""
    return 1 if media_type in MediaType.INDEXES else 0


class TagAnswers:
    """The upstream's answers for one tag: at most one manifest per media type.

    A tag names one manifest upstream; a client that takes no index may get another (one
    platform's manifest, or a 404). One answer per media type holds every client's answer, and
    no spelling of Accept can make the entry grow past `len(MediaType.MANIFESTS)`.
    """

    __slots__ = ("_by_type",)

    def __init__(self, by_type: Mapping[str, Resolution] | None = None) -> None:
        self._by_type = dict(by_type or {})

    def __iter__(self) -> Iterator[Resolution]:
        return iter(self._by_type.values())

    def __len__(self) -> int:
        return len(self._by_type)

    def choose(self, types: frozenset[str]) -> Resolution | None:
        """What the upstream would answer a client admitting `types`, as far as we know: an
        index over an image manifest; among equals, the one confirmed last (the tag moved)."""
        candidates = [r for r in self._by_type.values() if r.answers(types)]
        if not candidates:
            return None
        return max(candidates, key=lambda r: (_rank(r.media_type), r.checked, r.media_type))

    def record(self, types: frozenset[str], resolution: Resolution) -> TagAnswers:
        """The upstream answered `resolution` to a client admitting `types`.

        Whatever else `types` admits and ranks as high is outdated (the tag moved). Image
        manifests below a new index stay: they are the answers of clients without indexes,
        except to clients taking that index type, who get the index from now on.
        """
        rank = _rank(resolution.media_type)
        kept = {
            media_type: known
            for media_type, known in self._by_type.items()
            if media_type not in types or _rank(media_type) < rank
        }
        if rank:
            for media_type, known in kept.items():
                if resolution.media_type in known.indexes:
                    narrower = tuple(t for t in known.indexes if t != resolution.media_type)
                    kept[media_type] = replace(known, indexes=narrower)
        indexes = set(types & MediaType.INDEXES)
        previous = self._by_type.get(resolution.media_type)
        if previous is not None and previous.digest == resolution.digest:
            indexes.update(previous.indexes)
        kept[resolution.media_type] = replace(resolution, indexes=tuple(sorted(indexes)))
        return TagAnswers(kept)

    def refused(self, types: frozenset[str]) -> TagAnswers:
        """The upstream answered 404 to `types`: nothing those types admit is the tag's now."""
        return TagAnswers({t: r for t, r in self._by_type.items() if t not in types})

    def invalidated(self) -> TagAnswers:
        return TagAnswers({t: replace(r, checked=0.0) for t, r in self._by_type.items()})

    def to_json(self) -> dict[str, Any]:
        return {media_type: asdict(known) for media_type, known in self._by_type.items()}

    @classmethod
    def from_json(cls, value: Any) -> TagAnswers:
        """Tolerant: anything malformed is dropped, it is only a cache. The previous version
        keyed answers by a hash of the raw Accept set; those are kept without knowing which
        index types their client took, so an image manifest among them answers only clients
        without indexes until the upstream confirms it again."""
        if not isinstance(value, dict):
            return cls()
        by_type: dict[str, Resolution] = {}
        for key, fields in value.items():
            known = _resolution(fields)
            if known is None:
                continue
            if key != known.media_type:
                known = replace(known, indexes=())
            previous = by_type.get(known.media_type)
            if previous is None or previous.checked < known.checked:
                by_type[known.media_type] = known
        return cls(by_type)


def _resolution(fields: Any) -> Resolution | None:
    if not isinstance(fields, dict):
        return None
    digest, media_type = fields.get("digest"), fields.get("media_type")
    size, checked = fields.get("size"), fields.get("checked")
    indexes = fields.get("indexes", [])
    if not (isinstance(digest, str) and isinstance(media_type, str)):
        return None
    if not (isinstance(size, int) and isinstance(checked, int | float)):
        return None
    if media_type not in MediaType.MANIFESTS or not isinstance(indexes, list):
        return None
    try:
        Digest.parse(digest)
    except RegistryError:
        return None
    kept = tuple(sorted({t for t in indexes if t in MediaType.INDEXES}))
    return Resolution(digest, media_type, size, float(checked), kept)


@dataclass(frozen=True, slots=True)
class Misses:
    """The manifest-type sets an upstream answered 404 for a tag, each until it expires.

    A 404 to a client that admits fewer types may be about its Accept (an OCI index asked for
    without index types); it covers that set and its subsets only. A 404 to a client admitting
    every manifest type is "no such tag" for everyone.
    """

    entries: tuple[tuple[frozenset[str], float], ...] = ()

    MAX: ClassVar[int] = 8

    def __len__(self) -> int:
        return len(self.entries)

    def covers(self, types: frozenset[str], *, now: float) -> bool:
        return any(types <= refused and now < until for refused, until in self.entries)

    def add(self, types: frozenset[str], *, until: float, now: float) -> Misses:
        kept = [(t, u) for t, u in self.entries if now < u and not t <= types]
        kept.append((types, until))
        return Misses(tuple(kept[-self.MAX :]))

    def without(self, answered: Callable[[frozenset[str]], bool]) -> Misses:
        return Misses(tuple((t, u) for t, u in self.entries if not answered(t)))

    def to_json(self) -> list[dict[str, Any]]:
        return [{"types": sorted(types), "until": until} for types, until in self.entries]

    @classmethod
    def from_json(cls, value: Any) -> Misses:
        """The previous version stored a bare 1 for any 404: unknown whose, so ignored."""
        if not isinstance(value, list):
            return cls()
        entries = []
        for item in value:
            if not isinstance(item, dict):
                continue
            types, until = item.get("types"), item.get("until")
            if isinstance(types, list) and isinstance(until, int | float):
                entries.append((frozenset(str(t) for t in types), float(until)))
        return cls(tuple(entries[-cls.MAX :]))
