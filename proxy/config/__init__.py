"""Settings: one object with every knob, read from a TOML file, the environment and flags.

Precedence is flags > environment (`REGISTRY_PROXY_<KEY>`) > file > defaults. Everything is
validated at start-up; a bad value raises `ConfigError` naming the setting, which the CLI
prints as one line. This module holds the settings themselves (their defaults are the only
ones: the CLI's help texts read them); `values` parses one value, `tables` the file's tables,
`load` merges the sources (`load_settings`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from yarl import URL

from proxy.oci import dockerhub
from proxy.oci.references import ImageReference

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
    # `parallel_download_parts` ranged requests (1: one connection per blob) when its first
    # connection brings less than `parallel_download_below` bytes a second over its first
    # `parallel_download_probe` seconds (0: split at once).
    resume_attempts: int = 4
    resume_backoff: float = 0.25
    parallel_download_threshold: int = 64 * 1024 * 1024
    parallel_download_parts: int = 4
    parallel_download_probe: float = 0.5
    parallel_download_below: int = 64 * 1024 * 1024
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
    # The largest manifest (or referrers index) read from an upstream. Registries should accept
    # manifests of at least 4 MiB (OCI distribution spec 1.1, "Pushing Manifests").
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
