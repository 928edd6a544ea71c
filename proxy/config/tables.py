"""The TOML file's tables: [[upstreams]], [[access]], tag_ttls lists and the pins list."""

from __future__ import annotations

import re
from typing import Any, Final

from yarl import URL

from proxy.config import DOCKER_HUB_URL, AccessRule, ConfigError, Secret, TagTtl, UpstreamSettings
from proxy.config.values import (
    boolean,
    parse,
    parse_url,
    pin_list,
    positive_duration,
    read_secret_file,
    registry_name,
)
from proxy.oci.references import ImageReference

UPSTREAM_KEYS: Final = frozenset(
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


def tag_ttl_rules(where: str, value: Any) -> tuple[TagTtl, ...]:
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
        rules.append(TagTtl(pattern, parse(f"{item}.ttl", positive_duration, table["ttl"])))
    return tuple(rules)


def access_rules(value: Any) -> tuple[AccessRule, ...]:
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


def parse_pin_list(value: Any) -> tuple[ImageReference, ...]:
    try:
        return pin_list(value)
    except ValueError as exc:
        raise ConfigError("pins", str(exc)) from None


def default_upstream(values: dict[str, Any]) -> UpstreamSettings:
    url: URL = values.get("upstream") or URL(DOCKER_HUB_URL)
    password = values.get("upstream_password_file") or values.get("upstream_password")
    return UpstreamSettings(
        name=registry_name(url),
        url=url,
        username=values.get("upstream_username"),
        password=Secret(password) if password else None,
    )


def upstream_from_table(index: int, table: Any) -> UpstreamSettings:
    where = f"upstreams[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table ([[upstreams]])")
    for key in table:
        if key not in UPSTREAM_KEYS:
            raise ConfigError(f"{where}.{key}", "unknown setting")
    if "url" not in table:
        raise ConfigError(f"{where}.url", "missing")
    url = parse(f"{where}.url", parse_url, table["url"])
    password: str | None = None
    if "password_file" in table:
        password = parse(f"{where}.password_file", read_secret_file, table["password_file"])
    elif "password" in table:
        password = parse(f"{where}.password", str, table["password"])
    tag_ttl = table.get("tag_ttl")
    return UpstreamSettings(
        name=str(table.get("name") or registry_name(url)),
        url=url,
        username=table.get("username"),
        password=Secret(password) if password else None,
        tag_ttls=tag_ttl_rules(f"{where}.tag_ttls", table.get("tag_ttls", [])),
        pass_client_credentials=parse(
            f"{where}.pass_client_credentials",
            boolean,
            table.get("pass_client_credentials", False),
        ),
        tag_ttl=None if tag_ttl is None else parse(f"{where}.tag_ttl", positive_duration, tag_ttl),
        token_realm_hosts=host_list(
            f"{where}.token_realm_hosts", table.get("token_realm_hosts", [])
        ),
        prefetch=None
        if "prefetch" not in table
        else parse(f"{where}.prefetch", boolean, table["prefetch"]),
    )


def host_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ConfigError(where, "expected a list of host names")
    return tuple(host.lower() for host in value)
