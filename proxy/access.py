"""Who may pull what: client authentication and per-upstream / per-repository allow-lists.

Off by default (a mirror on a trusted LAN). When an htpasswd file (bcrypt entries, as
`htpasswd -B` writes them) or a tokens file is configured, every `/v2/` request needs
credentials: HTTP Basic against the htpasswd file, or `Authorization: Bearer <token>` with a
static token (containerd sends one from a `hosts.toml` `[host."...".header]` table). Missing or
wrong credentials get `401 UNAUTHORIZED` with a Basic challenge, which Docker, containerd,
podman and skopeo answer with the credentials they were given for the mirror's host.

Allow-lists (`[[access]]` rules) name identities and the `<upstream>/<repository>` patterns
they may pull (shell-style globs). With no rules, every authenticated identity may pull
everything; with rules, an identity pulls only what a rule naming it (or `*`) allows.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import bcrypt

from proxy.oci import ErrorCode, RegistryError

log = logging.getLogger(__name__)

ANONYMOUS: Final = "anonymous"
CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="registry-proxy"'}
# bcrypt is slow on purpose; a verified password is remembered briefly so a pull of 30 layers
# does not cost 30 bcrypt checks.
VERIFIED_TTL: Final = 300.0


@dataclass(frozen=True)
class AccessRule:
    identities: tuple[str, ...]  # user or token names; "*" is any authenticated identity
    allow: tuple[str, ...]  # globs over "<upstream>/<repository>"

    def applies_to(self, identity: str) -> bool:
        return "*" in self.identities or identity in self.identities

    def allows(self, resource: str) -> bool:
        return any(fnmatch.fnmatchcase(resource, pattern) for pattern in self.allow)


class AccessControl:
    def __init__(
        self,
        passwords: dict[str, bytes] | None = None,
        tokens: dict[str, str] | None = None,
        rules: tuple[AccessRule, ...] = (),
    ) -> None:
        self.passwords = passwords or {}  # user -> bcrypt hash
        self.tokens = tokens or {}  # token -> name
        self.rules = rules
        self._verified: dict[bytes, float] = {}

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

    def authenticate(self, authorization: str | None) -> str:
        """The identity behind an `Authorization` header; raises 401 when it proves nothing."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        identity: str | None = None
        if scheme.lower() == "basic":
            identity = self._check_basic(credentials.strip())
        elif scheme.lower() == "bearer":
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

    def _check_basic(self, credentials: str) -> str | None:
        try:
            user, sep, password = (
                base64.b64decode(credentials, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        hashed = self.passwords.get(user)
        if not sep or hashed is None:
            return None
        key = hashlib.sha256(f"{user}\0{password}".encode() + hashed).digest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return user
        try:
            good = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return None
        if not good:
            return None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[key] = now + VERIFIED_TTL
        return user

    def _check_token(self, token: str) -> str | None:
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return name
        return None


def read_htpasswd(path: Path) -> dict[str, bytes]:
    users = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ValueError(f"{path}:{number}: only bcrypt entries are supported (htpasswd -B)")
        users[user] = hashed.encode()
    return users


def read_tokens(path: Path) -> dict[str, str]:
    """`name token` per line; the name is what logs and allow-lists call the client."""
    tokens = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, token = line.partition(" ")
        if not token.strip():
            raise ValueError(f"{path}:{number}: expected 'name token'")
        tokens[token.strip()] = name
    return tokens
