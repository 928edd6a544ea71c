"""HTTP authentication, both sides: schemes and challenges (RFC 9110 section 11), Basic
credentials (RFC 7617), and upstream bearer tokens by scope (Docker token auth), bounded."""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from yarl import URL

from proxy.config import UpstreamSettings
from proxy.errors import UpstreamUnavailable
from proxy.oci import dockerhub

log = logging.getLogger(__name__)

# Tokens are cached per scope, i.e. per repository name a client chooses: the table is pruned
# of expired tokens and capped, least recently used first out.
MAX_CACHED_TOKENS: Final = 1024
# Docker Hub documents a 60 s lifetime when the token response has no expires_in.
DEFAULT_TOKEN_LIFETIME: Final = 60.0

# auth-param = token BWS "=" BWS ( token / quoted-string ), RFC 9110 section 11.2
_AUTH_PARAM: Final = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class Scheme(StrEnum):
    """Authentication schemes, lower-cased (scheme names are case-insensitive)."""

    BASIC = "basic"  # RFC 7617
    BEARER = "bearer"  # RFC 6750, as Docker token auth uses it


def is_scheme(authorization: str, scheme: Scheme) -> bool:
    """Whether an `Authorization` value uses `scheme`."""
    return authorization.partition(" ")[0].lower() == scheme


def basic_challenge(realm: str) -> str:
    """A `WWW-Authenticate` value asking for Basic credentials."""
    return f'Basic realm="{realm}"'


def basic_authorization(username: str, password: str) -> str:
    """An `Authorization` value with Basic credentials."""
    credentials = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")


def basic_credentials(encoded: str) -> tuple[str, str]:
    """The user and password of Basic credentials (the part after `Basic `); ValueError when
    they are not base64 of `user:password` in UTF-8."""
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("malformed Basic credentials") from exc
    return user, password


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


def token_url(challenge: Challenge, scope: str | None) -> URL:
    """Where to ask for a token a Bearer challenge names, for `scope`."""
    query = {"service": challenge.params.get("service", "")}
    if scope:
        query["scope"] = scope
    return URL(challenge.params["realm"]).update_query(query)


def token_of(document: Any) -> tuple[str, float] | None:
    """The token and its lifetime from a token response; None when it holds no token."""
    if not isinstance(document, dict):
        return None
    value = document.get("token") or document.get("access_token")
    if not isinstance(value, str) or not value:
        return None
    lifetime = document.get("expires_in")
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return value, float(lifetime)


class Authorizer:
    """What one upstream's requests carry in `Authorization`: nothing until it answers a 401,
    then Basic credentials or a Bearer token for the request's scope, fetched by `fetch` (the
    GET of a token realm, returning its JSON document). Tokens are kept by (whose credentials,
    scope), and one token request per key is in flight: a herd of misses shares it."""

    def __init__(self, settings: UpstreamSettings, fetch: TokenFetch) -> None:
        self.settings = settings
        self._fetch = fetch
        self._learned = _Learned()  # shared by every `for_client` view
        # For an upstream that passes client credentials on: the client's own `Authorization`
        # (see `for_client`); None is anonymous.
        self._client_credentials: str | None = None
        self.tokens = TokenTable()
        self._pending: dict[str, asyncio.Future[str]] = {}

    def for_client(self, credentials: str | None) -> Authorizer:
        """The same challenge and tokens, with one client's credentials."""
        view = copy.copy(self)
        view._client_credentials = credentials
        return view

    def learn(self, challenge: Challenge) -> None:
        """The upstream's latest challenge, which every later request answers."""
        self._learned.challenge = challenge

    async def authorization(self, scope: str | None, *, refresh: bool) -> str | None:
        challenge = self._learned.challenge
        if challenge is None:
            return None
        if challenge.scheme == Scheme.BASIC:
            return self._basic()
        if challenge.scheme != Scheme.BEARER or "realm" not in challenge.params:
            return None
        key = f"{self._credentials_id()}|{scope or ''}"
        token = None if refresh else self.tokens.get(key, time.monotonic())
        if token is not None:
            return f"Bearer {token}"
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_token(challenge, scope, key))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return f"Bearer {await asyncio.shield(pending)}"

    def may_send_credentials_to(self, realm: URL) -> bool:
        """Whether a token realm a 401 named may receive this upstream's credentials: on the
        upstream's own host or one configured for it, and over https unless the upstream
        itself is plain http."""
        own = self.settings.url
        if realm.scheme != "https" and not (realm.scheme == "http" and own.scheme == "http"):
            return False
        host = (own.host or "").lower()
        allowed = {host, *self.settings.token_realm_hosts, *dockerhub.REALM_HOSTS.get(host, ())}
        return (realm.host or "").lower() in allowed

    def _credentials_id(self) -> str:
        """Whose tokens these are: ours, or (passing client credentials) this client's."""
        if not self.settings.pass_client_credentials:
            return ""
        credentials = self._client_credentials
        if credentials is None:
            return "anonymous"
        return hashlib.sha256(credentials.encode()).hexdigest()[:32]

    async def _fetch_token(self, challenge: Challenge, scope: str | None, key: str) -> str:
        realm = token_url(challenge, scope)
        headers = {}
        if (basic := self._basic()) is not None:
            if self.may_send_credentials_to(realm):
                headers["Authorization"] = basic
            else:
                log.warning(
                    "upstream %s names token realm %s; asking it without credentials "
                    "(credentials go only to the upstream's host or its token_realm_hosts, "
                    "and not over plain http)",
                    self.settings.name, realm.with_query(None),
                )  # fmt: skip
        if (token := token_of(await self._fetch(realm, headers))) is None:
            raise UpstreamUnavailable(self.settings.name, "token endpoint returned no token")
        value, lifetime = token
        # Renew a little early so a token never expires in flight.
        now = time.monotonic()
        self.tokens.put(key, value, now + max(lifetime - 10, 1), now)
        return value

    def _basic(self) -> str | None:
        if self.settings.pass_client_credentials:
            client = self._client_credentials
            return client if client and is_scheme(client, Scheme.BASIC) else None
        username, password = self.settings.username, self.settings.password
        if username is None or password is None:
            return None
        return basic_authorization(username, password.reveal())


# GET a token realm with these headers: the JSON document it answered.
TokenFetch = Callable[[URL, Mapping[str, str]], Awaitable[Any]]


@dataclass(slots=True)
class _Learned:
    challenge: Challenge | None = None
