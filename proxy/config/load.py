"""Loading: merge the TOML file, the environment and flags into validated `Settings`."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from proxy.config import (
    ENV_PREFIX,
    AccessRule,
    ConfigError,
    Settings,
    TagTtl,
    UpstreamSettings,
)
from proxy.config.tables import (
    access_rules,
    default_upstream,
    parse_pin_list,
    tag_ttl_rules,
    upstream_from_table,
)
from proxy.config.values import (
    boolean,
    htpasswd_file,
    is_loopback,
    log_format,
    log_level,
    parse,
    parse_duration,
    parse_listen,
    parse_size,
    parse_url,
    pins_text,
    positive_duration,
    positive_float,
    positive_int,
    read_secret_file,
    readable_file,
    redis_url,
    tokens_file,
    whole_number,
)
from proxy.oci.references import ImageReference

# Every top-level setting: its parser. Keys are the TOML names; the environment variable is
# REGISTRY_PROXY_ + the upper-cased key; the flag is -- + the key with dashes.
PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "listen": parse_listen,
    "upstream": parse_url,
    "upstream_username": str,
    "upstream_password": str,
    "upstream_password_file": read_secret_file,
    "cache_dir": Path,
    "cache_max_size": parse_size,
    "log_level": log_level,
    "connect_timeout": positive_float,
    "read_timeout": positive_float,
    "response_timeout": positive_duration,
    "download_timeout": positive_float,
    "resume_attempts": whole_number,
    "resume_backoff": positive_duration,
    "parallel_download_threshold": parse_size,
    "parallel_download_parts": positive_int,
    "parallel_download_probe": parse_duration,
    "parallel_download_below": parse_size,
    "tag_ttl": positive_duration,
    "stale_ttl": positive_duration,
    "negative_ttl": parse_duration,
    "revalidate_timeout": positive_duration,
    "breaker_failures": positive_int,
    "breaker_cooldown": positive_duration,
    "redis_url": redis_url,
    "allow_any_registry": boolean,
    "metrics_listen": parse_listen,
    "log_format": log_format,
    "ready_requires_upstream": boolean,
    "admin_listen": parse_listen,
    "admin_token_file": readable_file,
    "pins": pins_text,
    "pin_refresh": positive_duration,
    "workers": positive_int,
    "max_downloads": positive_int,
    "max_downloads_per_upstream": positive_int,
    "max_blob_size": parse_size,
    "max_manifest_size": parse_size,
    "send_timeout": positive_duration,
    "max_header_size": positive_int,
    "tls_cert": readable_file,
    "tls_key": readable_file,
    "auth_htpasswd": htpasswd_file,
    "auth_tokens_file": tokens_file,
    "prefetch": boolean,
    "prefetch_concurrency": positive_int,
    "quota_reserve": whole_number,
}


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Settings:
    """Merge file, environment and flags into validated `Settings`."""
    document = read_toml(config_file) if config_file is not None else {}
    tables = _FileTables.take_from(document)
    raw: dict[str, Any] = dict(document)
    environ = os.environ if environ is None else environ
    for key in PARSERS:
        if (value := environ.get(ENV_PREFIX + key.upper())) is not None:
            raw[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            raw[key] = value

    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = PARSERS.get(key)
        if parser is None:
            raise ConfigError(key, "unknown setting")
        values[key] = parse(key, parser, value)

    upstreams = _upstreams(values, tables.upstreams)
    host, port = values.pop("listen", (_DEFAULTS.listen_host, _DEFAULTS.listen_port))
    for key in ("upstream", "upstream_username", "upstream_password", "upstream_password_file"):
        values.pop(key, None)
    if tables.tag_ttls is not None:
        values["tag_ttls"] = tables.tag_ttls
    values["access"] = tables.access
    if tables.pins is not None and "pins" not in values:
        values["pins"] = tables.pins  # the file's list, unless the environment or a flag set pins
    _check_combinations(values, upstreams)
    return Settings(listen_host=host, listen_port=port, upstreams=upstreams, **values)


_DEFAULTS: Final = Settings()


@dataclass(frozen=True)
class _FileTables:
    """What the file holds beyond key = value: tables and lists, parsed apart."""

    upstreams: list[Any]
    tag_ttls: tuple[TagTtl, ...] | None
    access: tuple[AccessRule, ...]
    pins: tuple[ImageReference, ...] | None

    @classmethod
    def take_from(cls, document: dict[str, Any]) -> _FileTables:
        """Pop the tables out of `document`, leaving its plain settings."""
        return cls(
            upstreams=document.pop("upstreams", []),
            tag_ttls=tag_ttl_rules("tag_ttls", document.pop("tag_ttls"))
            if "tag_ttls" in document
            else None,
            access=access_rules(document.pop("access")) if "access" in document else (),
            pins=parse_pin_list(document.pop("pins")) if "pins" in document else None,
        )


def _upstreams(values: dict[str, Any], tables: list[Any]) -> tuple[UpstreamSettings, ...]:
    upstreams = [default_upstream(values)]
    upstreams += [upstream_from_table(i, table) for i, table in enumerate(tables)]
    if "upstream" not in values and tables:
        upstreams.pop(0)  # the file's [[upstreams]] replace the built-in Docker Hub default
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams", f"duplicate upstream names in {names}")
    return tuple(upstreams)


def _check_combinations(values: dict[str, Any], upstreams: tuple[UpstreamSettings, ...]) -> None:
    """Settings that are valid alone but not together."""
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


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # tomllib decodes UTF-8 itself
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
