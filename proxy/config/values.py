"""Parsers of single setting values: sizes, durations, addresses, URLs, files; the auth files.

Each takes the text a file, the environment or a flag gives and returns the value or raises
`ValueError` with a message for the user; `parse` names the setting in a `ConfigError`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

from yarl import URL

from proxy.config import ConfigError
from proxy.oci import dockerhub
from proxy.oci.references import ImageReference, InvalidReference

_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")
_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


def parse_size(text: str) -> int:
    """`50GiB`, `500MB`, `1G`, `1048576`: binary units for K/M/G/T and *iB, decimal for *B."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 50GiB, 500MB, 1048576)")
    size = int(Fraction(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be larger than zero")
    return size


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (example: 0.0.0.0:5000)")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_url(text: str) -> URL:
    url = URL(text.rstrip("/"))
    if url.user is not None or url.password is not None:
        # Never repeated back: the message would put the password in a log or a terminal.
        raise ValueError(
            "must not carry a user name or password; use username and password_file "
            "(upstream_username and upstream_password_file for the default upstream)"
        )
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{text!r} is not an http(s) URL (example: https://registry-1.docker.io)")
    if url.query_string or url.fragment:
        raise ValueError(f"{text!r} must not have a query or fragment")
    return url


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def registry_name(url: URL) -> str:
    """The name clients use for a registry: Docker Hub's API host is known as docker.io."""
    host = url.host or ""
    if host in dockerhub.HOSTS:
        return dockerhub.DOCKER_HUB
    return host if url.is_default_port() else f"{host}:{url.port}"


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:  # float() also accepts "nan" and "inf"
        raise ValueError("must be a finite number larger than zero")
    return value


_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|)")
_DURATION_UNITS: Final = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h`, `1d`, `500ms`: seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 10m, 1h, 1d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be larger than zero")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


def whole_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def redis_url(text: str) -> str:
    url = URL(text)
    if url.scheme not in ("redis", "rediss") or not url.host:
        raise ValueError(f"{text!r} is not a redis:// URL (example: redis://127.0.0.1:6379/0)")
    return text


def log_format(text: str) -> str:
    if text.lower() not in ("json", "text"):
        raise ValueError("must be json or text")
    return text.lower()


def log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return text.lower()


def readable_file(text: str) -> Path:
    path = Path(text)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None
    return path


def pins_text(text: str) -> tuple[ImageReference, ...]:
    """Image references separated by commas or white space (the environment's form)."""
    return pin_list(text.replace(",", " ").split())


def pin_list(items: Any) -> tuple[ImageReference, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('expected a list of image references, e.g. ["ghcr.io/org/app:1.2"]')
    try:
        return tuple(dict.fromkeys(ImageReference.parse(item) for item in items))
    except InvalidReference as exc:
        raise ValueError(str(exc)) from None


def htpasswd_file(text: str) -> Path:
    path = readable_file(text)
    read_htpasswd(path)  # a bad line stops start-up, not the first pull
    return path


def tokens_file(text: str) -> Path:
    path = readable_file(text)
    read_tokens(path)
    return path


def read_secret_file(text: str) -> str:
    try:
        return Path(text).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None


def parse(key: str, parser: Callable[[str], Any], value: Any) -> Any:
    if isinstance(value, bool) and parser is boolean:
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, f"expected a string or number, got {type(value).__name__}")
    try:
        return parser(str(value))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def read_htpasswd(path: Path) -> dict[str, bytes]:
    users = {}
    for where, line in _entries(path):
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ValueError(f"{where}: only bcrypt entries are supported (htpasswd -B)")
        users[user] = hashed.encode()
    return users


def read_tokens(path: Path) -> dict[str, str]:
    """`name token` per line; the name is what logs and allow-lists call the client."""
    tokens = {}
    for where, line in _entries(path):
        name, _, token = line.partition(" ")
        if not token.strip():
            raise ValueError(f"{where}: expected 'name token'")
        tokens[token.strip()] = name
    return tokens


def _entries(path: Path) -> Iterator[tuple[str, str]]:
    """The lines of an auth file that say something, with `path:number` for messages."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"{path}:{number}", line
