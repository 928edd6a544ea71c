"""Upstream authentication: challenges (RFC 9110 section 11), and bearer tokens by scope
(Docker token auth), bounded."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

# Tokens are cached per scope, i.e. per repository name a client chooses: the table is pruned
# of expired tokens and capped, least recently used first out.
MAX_CACHED_TOKENS: Final = 1024
# Docker Hub documents a 60 s lifetime when the token response has no expires_in.
DEFAULT_TOKEN_LIFETIME: Final = 60.0

# auth-param = token BWS "=" BWS ( token / quoted-string ), RFC 9110 section 11.2
_AUTH_PARAM: Final = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {
            m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
            for m in _AUTH_PARAM.finditer(rest)
        }
        return cls(scheme.lower(), params)


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


class TokenTable:
    """Bearer tokens by (credentials, scope): expired ones are dropped, and beyond `capacity`
    the least recently used go first, so clients inventing repository names cannot grow it."""

    def __init__(self, capacity: int = MAX_CACHED_TOKENS) -> None:
        self.capacity = capacity
        self._tokens: OrderedDict[str, _Token] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: str, now: float) -> str | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires <= now:
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token.value

    def put(self, key: str, value: str, expires: float, now: float) -> None:
        self._tokens[key] = _Token(value, expires)
        self._tokens.move_to_end(key)
        if len(self._tokens) <= self.capacity:
            return
        # Full: first whatever has expired (one pass, only when full), then the least recent.
        for stale in [k for k, t in self._tokens.items() if t.expires <= now]:
            del self._tokens[stale]
        while len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)
