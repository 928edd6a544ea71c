"""Who may pull what: client authentication and per-upstream / per-repository allow-lists.

Off by default (a mirror on a trusted LAN). When an htpasswd file (bcrypt entries, as
`htpasswd -B` writes them) or a tokens file is configured, every `/v2/` request needs
credentials: HTTP Basic against the htpasswd file, or `Authorization: Bearer <token>` with a
static token (containerd sends one from a `hosts.toml` `[host."...".header]` table). Missing or
wrong credentials get `401 UNAUTHORIZED` with a Basic challenge, which Docker, containerd,
podman and skopeo answer with the credentials they were given for the mirror's host.

Password checks cost a bcrypt verification on purpose, so they run in a small thread pool,
never on the event loop (a flood of guesses must not stall every other request); a result,
right or wrong, is remembered for a while under an HMAC of the credentials (never the
password itself), and concurrent requests with the same credentials share one check. Failed
attempts are limited per user name and per source address: beyond `FAILURES_PER_USER` or
`FAILURES_PER_SOURCE` in `FAILURE_WINDOW` seconds the answer is `429 TOOMANYREQUESTS` with a
`Retry-After`, without a check; credentials already verified still pass. An unknown user costs
a check against a dummy hash of the same cost, so timing does not tell which names exist.

Allow-lists (`[[access]]` rules) name identities and the `<upstream>/<repository>` patterns
they may pull (shell-style globs). With no rules, every authenticated identity may pull
everything; with rules, an identity pulls only what a rule naming it (or `*`) allows.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import bcrypt

from proxy.config import AccessRule
from proxy.config.values import read_htpasswd, read_tokens
from proxy.errors import ErrorCode, RegistryError
from proxy.upstream.auth import Scheme, basic_challenge, basic_credentials

log = logging.getLogger(__name__)

ANONYMOUS: Final = "anonymous"
CHALLENGE: Final = {"WWW-Authenticate": basic_challenge("registry-proxy")}
# bcrypt is slow on purpose; a verified password is remembered briefly so a pull of 30 layers
# does not cost 30 bcrypt checks, and a wrong one so a retrying client does not cost one each.
VERIFIED_TTL: Final = 300.0
REJECTED_TTL: Final = 60.0
REMEMBERED: Final = 10_000
# Threads for bcrypt: enough to keep logins moving, few enough to leave the cores to serving.
CHECK_THREADS: Final = 2
# Failed attempts allowed per user name and per source address in a window of seconds.
FAILURES_PER_USER: Final = 10
FAILURES_PER_SOURCE: Final = 30
FAILURE_WINDOW: Final = 60.0


class FailureLimit:
    """At most `limit` failures per key in a fixed window of `window` seconds; the table is
    bounded, forgetting the oldest windows first."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (end, count)

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        end, count = self._windows.get(key, (0.0, 0))
        remaining = end - self._clock()
        return remaining if remaining > 0 and count >= self.limit else 0.0

    def failed(self, key: str) -> None:
        now = self._clock()
        end, count = self._windows.pop(key, (0.0, 0))
        if end <= now:
            end, count = now + self.window, 0
        self._windows[key] = (end, count + 1)
        while len(self._windows) > REMEMBERED:
            self._windows.popitem(last=False)


class AccessControl:
    def __init__(
        self,
        passwords: dict[str, bytes] | None = None,
        tokens: dict[str, str] | None = None,
        rules: tuple[AccessRule, ...] = (),
        *,
        check: Callable[[bytes, bytes], bool] = bcrypt.checkpw,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.passwords = passwords or {}  # user -> bcrypt hash
        self.tokens = tokens or {}  # token -> name
        self.rules = rules
        self._check = check
        self._clock = clock
        self._memo_key = secrets.token_bytes(32)
        # HMAC of the credentials -> (until when, the user, or None for a wrong password)
        self._remembered: OrderedDict[bytes, tuple[float, str | None]] = OrderedDict()
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._per_user = FailureLimit(FAILURES_PER_USER, FAILURE_WINDOW, clock)
        self._per_source = FailureLimit(FAILURES_PER_SOURCE, FAILURE_WINDOW, clock)
        self._pool: ThreadPoolExecutor | None = None
        self._dummy = _dummy_hash(self.passwords.values())

    @classmethod
    def from_files(
        cls, htpasswd: Path | None, tokens: Path | None, rules: tuple[AccessRule, ...] = ()
    ) -> AccessControl:
        return cls(
            read_htpasswd(htpasswd) if htpasswd else None,
            read_tokens(tokens) if tokens else None,
            rules,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.passwords or self.tokens)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, authorization: str | None, source: str | None = None) -> str:
        """The identity behind an `Authorization` header from `source` (the client's address);
        raises 401 when it proves nothing, 429 after too many failures."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        identity: str | None = None
        if scheme.lower() == Scheme.BASIC:
            identity = await self._check_basic(credentials.strip(), source or "")
        elif scheme.lower() == Scheme.BEARER:
            identity = self._check_token(credentials.strip())
        if identity is None:
            raise RegistryError(
                ErrorCode.UNAUTHORIZED, "authentication required", headers=CHALLENGE
            )
        return identity

    def authorize(self, identity: str, upstream: str, repository: str) -> None:
        if not self.allows(identity, upstream, repository):
            resource = f"{upstream}/{repository}"
            raise RegistryError(ErrorCode.DENIED, f"{identity} may not pull {resource}")

    def allows(self, identity: str, upstream: str, repository: str) -> bool:
        if not self.rules:
            return True
        resource = f"{upstream}/{repository}"
        return any(rule.applies_to(identity) and rule.allows(resource) for rule in self.rules)

    async def _check_basic(self, credentials: str, source: str) -> str | None:
        try:
            user, password = basic_credentials(credentials)
        except ValueError:
            return None
        if not self.passwords:
            return None  # no users at all: nothing to tell apart by timing
        key = hmac.new(self._memo_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        now = self._clock()
        until, known = self._remembered.get(key, (0.0, None))
        remembered = until > now
        if remembered and known is not None:
            return known  # verified recently: no check, and no limit applies
        wait = max(self._per_user.retry_after(user), self._per_source.retry_after(source))
        if wait > 0:
            log.warning("too many failed logins for user %r or from %s", user[:100], source)
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                "too many failed logins; try again later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        if remembered:
            good = False  # the same wrong password again: no check
        else:
            good = await self._verify(key, user, password)
            self._remember(key, user if good else None, now)
        if good:
            return user
        self._per_user.failed(user)
        self._per_source.failed(source)
        return None

    async def _verify(self, key: bytes, user: str, password: str) -> bool:
        """bcrypt in the thread pool; requests with the same credentials share one check. An
        unknown user is checked against the dummy hash, so it takes as long as a known one."""
        known = self.passwords.get(user)
        pending = self._checking.get(key)
        if pending is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="bcrypt")
            pending = asyncio.get_running_loop().run_in_executor(
                self._pool,
                self._safe_check,
                password.encode(),
                known if known is not None else self._dummy,
            )
            self._checking[key] = pending
            pending.add_done_callback(lambda _: self._checking.pop(key, None))
        good = await asyncio.shield(pending)
        return good and known is not None

    def _safe_check(self, password: bytes, hashed: bytes) -> bool:
        try:
            return self._check(password, hashed)
        except ValueError:  # a malformed hash or a password bcrypt cannot take
            return False

    def _remember(self, key: bytes, user: str | None, now: float) -> None:
        self._remembered.pop(key, None)
        self._remembered[key] = (now + (VERIFIED_TTL if user else REJECTED_TTL), user)
        while len(self._remembered) > REMEMBERED:
            self._remembered.popitem(last=False)

    def _check_token(self, token: str) -> str | None:
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return name
        return None


def _dummy_hash(hashes: Iterable[bytes]) -> bytes:
    """A hash of a random password at the highest cost among the users' (`$2b$12$...`)."""
    costs = [int(hashed[4:6]) for hashed in hashes if hashed[4:6].isdigit()]
    if not costs:
        return b""
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=max(costs)))
