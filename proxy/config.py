"""Settings: one object with every knob, read from a TOML file, the environment and flags.

Precedence is flags > environment (`REGISTRY_PROXY_<KEY>`) > file > defaults. Everything is
validated here, at start-up; a bad value raises `ConfigError` naming the setting, which the CLI
prints as one line.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

from yarl import URL

from proxy.oci import dockerhub
from proxy.oci.references import ImageReference, InvalidReference

DOCKER_HUB_URL: Final = dockerhub.API_URL
ENV_PREFIX: Final = "REGISTRY_PROXY_"


class ConfigError(Exception):
    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"invalid setting {setting!r}: {problem}")


class Secret:
    """A credential that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TagTtl:
    """Tags whose whole name matches `pattern` (a regex) stay fresh for `ttl` seconds."""

    pattern: re.Pattern[str]
    ttl: float

    def matches(self, tag: str) -> bool:
        return self.pattern.fullmatch(tag) is not None


# Moving tags are revalidated often, release tags seldom (issue: "latest 1 minute, version-like
# tags 1 day"); anything else falls back to `tag_ttl`.
DEFAULT_TAG_TTLS: Final = (
    TagTtl(re.compile(r"latest|main|master|nightly|edge|dev|develop|canary|stable"), 60.0),
    TagTtl(re.compile(r"v?\d+(\.\d+)+([-+_.][0-9A-Za-z.-]+)?"), 86400.0),
)


@dataclass(frozen=True)
class AccessRule:
    identities: tuple[str, ...]  # user or token names; "*" is any authenticated identity
    allow: tuple[str, ...]  # globs over "<upstream>/<repository>"

    def applies_to(self, identity: str) -> bool:
        return "*" in self.identities or identity in self.identities

    def allows(self, resource: str) -> bool:
        return any(fnmatch.fnmatchcase(resource, pattern) for pattern in self.allow)


@dataclass(frozen=True)
class UpstreamSettings:
    name: str  # the registry host clients know it by: docker.io, ghcr.io, ...
    url: URL
    username: str | None = None
    password: Secret | None = None
    # Checked before the global rules; None falls back to the global `tag_ttl`.
    tag_ttls: tuple[TagTtl, ...] = ()
    tag_ttl: float | None = None
    # Hold no credentials: use each client's own, and serve cached content of this upstream only
    # to clients the upstream accepts for that repository (proxy.passthrough).
    pass_client_credentials: bool = False
    # Hosts besides the upstream's own whose token realm may receive its credentials
    # (registry.gitlab.com's realm is on gitlab.com); Docker Hub's is built in.
    token_realm_hosts: tuple[str, ...] = ()
    # Prefetch the blobs of the images served from it; None follows the global `prefetch`.
    prefetch: bool | None = None

    @property
    def is_docker_hub(self) -> bool:
        return self.name == dockerhub.DOCKER_HUB


@dataclass(frozen=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    upstreams: tuple[UpstreamSettings, ...] = ()
    cache_dir: Path = Path("/var/cache/registry-proxy")
    cache_max_size: int = 50 * 1024**3
    log_level: str = "info"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    # Until an upstream response's status and headers arrive (a black hole fails within it).
    response_timeout: float = 10.0
    # A whole blob download, which belongs to the cache and outlives the request that started it.
    download_timeout: float = 3600.0
    # A blob download whose upstream connection breaks continues where it broke (Range), after
    # `resume_backoff` (doubling), giving up after `resume_attempts` tries in a row without a
    # new byte (0: never resume). A blob over `parallel_download_threshold` bytes is fetched as
    # `parallel_download_parts` ranged requests at once (1: one connection per blob).
    resume_attempts: int = 4
    resume_backoff: float = 0.25
    parallel_download_threshold: int = 64 * 1024 * 1024
    parallel_download_parts: int = 4
    tag_ttl: float = 600.0
    tag_ttls: tuple[TagTtl, ...] = DEFAULT_TAG_TTLS
    # How long a tag resolution is kept to serve stale while the upstream fails.
    stale_ttl: float = 7 * 86400.0
    # How long an upstream 404 for a tag is remembered.
    negative_ttl: float = 30.0
    # A revalidation slower than this serves the stale answer instead of making clients wait.
    revalidate_timeout: float = 3.0
    # Consecutive failures that open an upstream's circuit breaker, and how long it stays open.
    breaker_failures: int = 5
    breaker_cooldown: float = 10.0
    # aiocache backend for tag resolutions: None keeps them in memory; redis://host:port/db.
    redis_url: str | None = None
    # Serve `?ns=<host>` for registries that are not configured, at https://<host>.
    allow_any_registry: bool = False
    # /metrics, /healthz and /readyz on their own address; None serves them on `listen` too.
    metrics_listen: tuple[str, int] | None = None
    # Limits: upstream blob downloads at once (all upstreams, and each), the largest blob,
    # how long one chunk may take to reach a client, and the longest request line or header.
    # Processes serving one port over one cache directory (proxy.workers).
    workers: int = 1
    max_downloads: int = 64
    max_downloads_per_upstream: int = 32
    max_blob_size: int | None = None
    # The largest manifest (or referrers index) read from an upstream; the spec's 4 MiB.
    max_manifest_size: int = 4 * 1024 * 1024
    send_timeout: float = 300.0
    max_header_size: int = 8190
    # HTTPS: PEM files, reloaded on SIGHUP or when they change on disk.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Client authentication (off when neither is set) and who may pull what.
    auth_htpasswd: Path | None = None
    auth_tokens_file: Path | None = None
    access: tuple[AccessRule, ...] = ()
    log_format: str = "json"
    ready_requires_upstream: bool = False
    # The admin API (off without an address) and its bearer token; images never evicted, and
    # how often their tags are resolved again.
    admin_listen: tuple[str, int] | None = None
    admin_token_file: Path | None = None
    pins: tuple[ImageReference, ...] = ()
    pin_refresh: float = 600.0
    # Download an image's missing blobs when its manifest is served, before clients ask
    # (proxy.cache.prefetch), at most this many at once. Unset: on for a single instance, off
    # for replicas sharing Redis, whose balancer sends each blob to the replica owning its
    # digest: a replica prefetching what another owns would fetch it twice.
    prefetch: bool | None = None
    prefetch_concurrency: int = 4
    # Below this many requests left in an upstream's rate-limit window, cached tags are served
    # without revalidation until it resets (proxy.upstream.quota); 0: only after a 429.
    quota_reserve: int = 10

    def tag_ttl_for(self, upstream: UpstreamSettings, tag: str) -> float:
        for rule in (*upstream.tag_ttls, *self.tag_ttls):
            if rule.matches(tag):
                return rule.ttl
        return upstream.tag_ttl if upstream.tag_ttl is not None else self.tag_ttl

    def prefetch_for(self, upstream: UpstreamSettings) -> bool:
        if upstream.prefetch is not None:
            return upstream.prefetch
        return self.prefetch if self.prefetch is not None else self.redis_url is None

    @property
    def default_upstream(self) -> UpstreamSettings:
        return self.upstreams[0]


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


def _positive_float(text: str) -> float:
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


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be larger than zero")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _redis_url(text: str) -> str:
    url = URL(text)
    if url.scheme not in ("redis", "rediss") or not url.host:
        raise ValueError(f"{text!r} is not a redis:// URL (example: redis://127.0.0.1:6379/0)")
    return text


def _tag_ttls(where: str, value: Any) -> tuple[TagTtl, ...]:
    if not isinstance(value, list):
        raise ConfigError(where, "expected a list of tables with pattern and ttl")
    rules = []
    for index, table in enumerate(value):
        item = f"{where}[{index}]"
        if not isinstance(table, dict) or set(table) != {"pattern", "ttl"}:
            raise ConfigError(item, "expected a table with exactly pattern and ttl")
        try:
            pattern = re.compile(str(table["pattern"]))
        except re.error as exc:
            raise ConfigError(f"{item}.pattern", f"not a regular expression: {exc}") from None
        rules.append(TagTtl(pattern, _parse(f"{item}.ttl", _positive_duration, table["ttl"])))
    return tuple(rules)


def _log_format(text: str) -> str:
    if text.lower() not in ("json", "text"):
        raise ValueError("must be json or text")
    return text.lower()


def _log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return text.lower()


def _readable_file(text: str) -> Path:
    path = Path(text)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None
    return path


def _pins(text: str) -> tuple[ImageReference, ...]:
    """Image references separated by commas or white space (the environment's form)."""
    return _pin_list(text.replace(",", " ").split())


def _pin_list(items: Any) -> tuple[ImageReference, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('expected a list of image references, e.g. ["ghcr.io/org/app:1.2"]')
    try:
        return tuple(dict.fromkeys(ImageReference.parse(item) for item in items))
    except InvalidReference as exc:
        raise ValueError(str(exc)) from None


def _htpasswd_file(text: str) -> Path:
    path = _readable_file(text)
    read_htpasswd(path)  # a bad line stops start-up, not the first pull
    return path


def _tokens_file(text: str) -> Path:
    path = _readable_file(text)
    read_tokens(path)
    return path


def _access_rules(value: Any) -> tuple[AccessRule, ...]:
    if not isinstance(value, list):
        raise ConfigError("access", "expected [[access]] tables with identities and allow")
    rules = []
    for index, table in enumerate(value):
        where = f"access[{index}]"
        if not isinstance(table, dict) or set(table) != {"identities", "allow"}:
            raise ConfigError(where, "expected a table with exactly identities and allow")
        lists = [table["identities"], table["allow"]]
        if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists):
            raise ConfigError(where, "identities and allow must be lists of strings")
        rules.append(AccessRule(tuple(table["identities"]), tuple(table["allow"])))
    return tuple(rules)


def _read_secret_file(text: str) -> str:
    try:
        return Path(text).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None


# Every top-level setting: its parser. Keys are the TOML names; the environment variable is
# REGISTRY_PROXY_ + the upper-cased key; the flag is -- + the key with dashes.
_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "listen": parse_listen,
    "upstream": parse_url,
    "upstream_username": str,
    "upstream_password": str,
    "upstream_password_file": _read_secret_file,
    "cache_dir": Path,
    "cache_max_size": parse_size,
    "log_level": _log_level,
    "connect_timeout": _positive_float,
    "read_timeout": _positive_float,
    "response_timeout": _positive_duration,
    "download_timeout": _positive_float,
    "resume_attempts": _whole_number,
    "resume_backoff": _positive_duration,
    "parallel_download_threshold": parse_size,
    "parallel_download_parts": _positive_int,
    "tag_ttl": _positive_duration,
    "stale_ttl": _positive_duration,
    "negative_ttl": parse_duration,
    "revalidate_timeout": _positive_duration,
    "breaker_failures": _positive_int,
    "breaker_cooldown": _positive_duration,
    "redis_url": _redis_url,
    "allow_any_registry": _boolean,
    "metrics_listen": parse_listen,
    "log_format": _log_format,
    "ready_requires_upstream": _boolean,
    "admin_listen": parse_listen,
    "admin_token_file": _readable_file,
    "pins": _pins,
    "pin_refresh": _positive_duration,
    "workers": _positive_int,
    "max_downloads": _positive_int,
    "max_downloads_per_upstream": _positive_int,
    "max_blob_size": parse_size,
    "max_manifest_size": parse_size,
    "send_timeout": _positive_duration,
    "max_header_size": _positive_int,
    "tls_cert": _readable_file,
    "tls_key": _readable_file,
    "auth_htpasswd": _htpasswd_file,
    "auth_tokens_file": _tokens_file,
    "prefetch": _boolean,
    "prefetch_concurrency": _positive_int,
    "quota_reserve": _whole_number,
}
_UPSTREAM_KEYS: Final = frozenset(
    {
        "name",
        "url",
        "username",
        "password",
        "password_file",
        "tag_ttl",
        "tag_ttls",
        "pass_client_credentials",
        "token_realm_hosts",
        "prefetch",
    }
)


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Settings:
    """Merge file, environment and flags into validated `Settings`."""
    raw: dict[str, Any] = {}
    extra_upstreams: list[Any] = []
    tag_ttls: tuple[TagTtl, ...] | None = None
    access: tuple[AccessRule, ...] = ()
    pins: tuple[ImageReference, ...] | None = None
    if config_file is not None:
        document = _read_toml(config_file)
        extra_upstreams = document.pop("upstreams", [])
        if "tag_ttls" in document:
            tag_ttls = _tag_ttls("tag_ttls", document.pop("tag_ttls"))
        if "access" in document:
            access = _access_rules(document.pop("access"))
        if "pins" in document:
            pins = _parse_pin_list(document.pop("pins"))
        raw.update(document)
    environ = os.environ if environ is None else environ
    for key in _PARSERS:
        if (value := environ.get(ENV_PREFIX + key.upper())) is not None:
            raw[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            raw[key] = value

    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = _PARSERS.get(key)
        if parser is None:
            raise ConfigError(key, "unknown setting")
        values[key] = _parse(key, parser, value)

    upstreams = [_default_upstream(values)]
    upstreams += [_upstream_from_table(i, table) for i, table in enumerate(extra_upstreams)]
    if "upstream" not in values and extra_upstreams:
        upstreams.pop(0)  # the file's [[upstreams]] replace the built-in Docker Hub default
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams", f"duplicate upstream names in {names}")

    host, port = values.pop("listen", ("0.0.0.0", 5000))
    for key in ("upstream", "upstream_username", "upstream_password", "upstream_password_file"):
        values.pop(key, None)
    if tag_ttls is not None:
        values["tag_ttls"] = tag_ttls
    values["access"] = access
    if pins is not None and "pins" not in values:
        values["pins"] = pins  # the file's list, unless the environment or a flag set pins
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ConfigError("tls_cert", "tls_cert and tls_key go together")
    admin = values.get("admin_listen")
    if admin is not None and "admin_token_file" not in values and not is_loopback(admin[0]):
        # Anyone who reaches it could evict the cache and replace the pins.
        raise ConfigError(
            "admin_token_file",
            f"required when admin_listen ({admin[0]}) is not a loopback address",
        )
    mirror_auth = [key for key in ("auth_htpasswd", "auth_tokens_file") if key in values]
    passing = [u.name for u in upstreams if u.pass_client_credentials]
    if mirror_auth and passing:
        # A client sends one Authorization header: the mirror's own users' passwords would be
        # forwarded to the upstream in their name.
        raise ConfigError(
            "pass_client_credentials",
            f"upstream {passing[0]} passes client credentials on, which cannot be combined "
            f"with {mirror_auth[0]} (the mirror's own users' passwords would go upstream)",
        )
    return Settings(listen_host=host, listen_port=port, upstreams=tuple(upstreams), **values)


def _parse_pin_list(value: Any) -> tuple[ImageReference, ...]:
    try:
        return _pin_list(value)
    except ValueError as exc:
        raise ConfigError("pins", str(exc)) from None


def _parse(key: str, parser: Callable[[str], Any], value: Any) -> Any:
    if isinstance(value, bool) and parser is _boolean:
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, f"expected a string or number, got {type(value).__name__}")
    try:
        return parser(str(value))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # tomllib decodes UTF-8 itself
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def _default_upstream(values: dict[str, Any]) -> UpstreamSettings:
    url: URL = values.get("upstream") or URL(DOCKER_HUB_URL)
    password = values.get("upstream_password_file") or values.get("upstream_password")
    return UpstreamSettings(
        name=registry_name(url),
        url=url,
        username=values.get("upstream_username"),
        password=Secret(password) if password else None,
    )


def _upstream_from_table(index: int, table: Any) -> UpstreamSettings:
    where = f"upstreams[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table ([[upstreams]])")
    for key in table:
        if key not in _UPSTREAM_KEYS:
            raise ConfigError(f"{where}.{key}", "unknown setting")
    if "url" not in table:
        raise ConfigError(f"{where}.url", "missing")
    url = _parse(f"{where}.url", parse_url, table["url"])
    password: str | None = None
    if "password_file" in table:
        password = _parse(f"{where}.password_file", _read_secret_file, table["password_file"])
    elif "password" in table:
        password = _parse(f"{where}.password", str, table["password"])
    tag_ttl = table.get("tag_ttl")
    return UpstreamSettings(
        name=str(table.get("name") or registry_name(url)),
        url=url,
        username=table.get("username"),
        password=Secret(password) if password else None,
        tag_ttls=_tag_ttls(f"{where}.tag_ttls", table.get("tag_ttls", [])),
        pass_client_credentials=_parse(
            f"{where}.pass_client_credentials",
            _boolean,
            table.get("pass_client_credentials", False),
        ),
        tag_ttl=None
        if tag_ttl is None
        else _parse(f"{where}.tag_ttl", _positive_duration, tag_ttl),
        token_realm_hosts=_host_list(
            f"{where}.token_realm_hosts", table.get("token_realm_hosts", [])
        ),
        prefetch=None
        if "prefetch" not in table
        else _parse(f"{where}.prefetch", _boolean, table["prefetch"]),
    )


def _host_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ConfigError(where, "expected a list of host names")
    return tuple(host.lower() for host in value)


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
