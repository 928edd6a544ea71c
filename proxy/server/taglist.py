"""Tag lists (OCI distribution spec, "Listing Tags"): `n`, `last` and the `Link` header.

Tags are served in lexical order (byte order, as Go's `sort.Strings` and the conformance suite
have it), whatever order the upstream sent them in. The mirror passes `n` and `last` on. An
upstream that honours them answers with at most `n` tags after `last`, and a `Link: <...>;
rel="next"` when more remain; that page is served as it came, the link pointing back at the
mirror. An upstream that ignores them (Distribution 2.8 does) sends every tag; the mirror then
pages the list itself, as the spec describes: the tags after `last`, at most `n`, and a `Link`
to the next page when more remain. `n=0` is an empty list without a `Link`. No I/O here:
routes fetch, this module decides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlencode

from yarl import URL

from proxy.errors import ErrorCode, RegistryError

# RFC 8288 section 3: Link = "<" URI-Reference ">" *( OWS ";" OWS link-param )
_NEXT_LINK: Final = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TagQuery:
    """The pagination a client asked for: at most `n` tags, those after `last`."""

    n: int | None = None
    last: str | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> TagQuery:
        n_text = query.get("n")
        if n_text is not None and not (n_text.isascii() and n_text.isdigit()):
            raise RegistryError(
                ErrorCode.UNSUPPORTED, "n must be a number", status=HTTPStatus.BAD_REQUEST
            )
        return cls(int(n_text) if n_text is not None else None, query.get("last"))

    @property
    def paginated(self) -> bool:
        return self.n is not None or self.last is not None

    def upstream_query(self) -> str:
        """The spec's parameters only, re-encoded by us: nothing else a client sent goes on."""
        return _encode(self.last, self.n)

    def page(self, body: bytes, upstream_link: str | None, path: str, ns: str | None) -> TagPage:
        """The answer for the client from the upstream's `body` and `Link`.

        `path` is the client's own request path and `ns` its `?ns=`, so a next-page link brings
        the client back here, routed to the same upstream.
        """
        link = _relink(upstream_link, path, ns) if upstream_link is not None else None
        if link is not None:
            return TagPage(body, link)
        if not self.paginated:
            try:
                return TagPage(_in_order(body, *_parse(body)), None)
            except RegistryError:
                return TagPage(body, None)  # not ours to judge when nothing is to be paged
        name, tags = _parse(body)
        ignored = (self.n is not None and len(tags) > self.n) or (
            self.last is not None and self.last in tags
        )
        if not ignored:  # the whole list, or the upstream paged and this is its last page
            return TagPage(_in_order(body, name, tags), None)
        # Strictly after `last`, so following the links always ends.
        after = sorted(tag for tag in tags if self.last is None or tag > self.last)
        chosen = after if self.n is None else after[: self.n]
        link = None
        if self.n and len(after) > self.n:
            link = _link(path, _encode(chosen[-1], self.n), ns)
        return TagPage(_document(name, chosen), link)


@dataclass(frozen=True, slots=True)
class TagPage:
    body: bytes
    link: str | None


def _document(name: Any, tags: list[str]) -> bytes:
    return json.dumps({"name": name, "tags": tags}).encode()


def _in_order(body: bytes, name: Any, tags: list[str]) -> bytes:
    """The list in lexical order, as the spec requires (Distribution 2.8 sends directory order):
    the upstream's bytes when they already are."""
    ordered = sorted(tags)
    return body if tags == ordered else _document(name, ordered)


def _parse(body: bytes) -> tuple[Any, list[str]]:
    """The `name` and `tags` of a tag list document."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        tags = document.get("tags")
        if tags is None:  # Distribution answers `"tags": null` for a repository without tags
            return document.get("name"), []
        if isinstance(tags, list) and all(isinstance(tag, str) for tag in tags):
            return document.get("name"), tags
    raise RegistryError(ErrorCode.UNAVAILABLE, "upstream sent an invalid tag list", status=502)


def _encode(last: str | None, n: int | None) -> str:
    pairs = [(key, value) for key, value in (("last", last), ("n", n)) if value is not None]
    return urlencode(pairs)


def _link(path: str, query: str, ns: str | None) -> str:
    if ns is not None:
        query += "&" + urlencode([("ns", ns)])
    return f'<{path}?{query}>; rel="next"'


def _relink(upstream_link: str, path: str, ns: str | None) -> str | None:
    """The upstream's next-page link, pointing at the same page of the mirror's own URL."""
    match = _NEXT_LINK.search(upstream_link)
    if match is None:
        return None
    try:
        query = URL(match.group(1)).query
    except ValueError:
        return None
    n = query.get("n")
    return _link(path, _encode(query.get("last"), int(n) if n and n.isdigit() else None), ns)
