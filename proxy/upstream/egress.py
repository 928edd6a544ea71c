"""Where upstream connections may go: the guard against SSRF through `allow_any_registry`.

With `allow_any_registry`, clients choose the registry host (`?ns=`). Without a guard a client
could make the mirror connect to its own loopback services, a cloud metadata endpoint
(169.254.169.254) or any host on the private network, and read the answer back through a tag
list or an error message; a hostile registry could do the same with a redirect or a token realm.

So every connection an on-demand upstream makes passes `AddressPolicy.permits` at connect
time, after DNS resolution (a socket factory on its connector sees the address about to be
connected to), which covers the registry itself, every redirect target and every token realm
in one place, and a DNS answer that changes between two lookups. Names that are addresses or
local by definition are refused before any lookup (`is_public_registry_name`). Configured
upstreams are the operator's choice and may be anywhere, private addresses included.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, Protocol

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver

IPAddress = IPv4Address | IPv6Address

# RFC 6052 section 2.1: the well-known NAT64 prefix 64:ff9b::/96 embeds an IPv4 address.
_NAT64_PREFIX: Final = int(IPv6Address("64:ff9b::")) >> 32


class AddressPolicy(Protocol):
    def permits(self, address: IPAddress, port: int) -> bool: ...


class AnyAddress:
    """Configured upstreams: the operator chose them, private addresses included."""

    def permits(self, address: IPAddress, port: int) -> bool:
        return True


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what a
    connection to it reaches."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if int(address) >> 32 == _NAT64_PREFIX:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address: not loopback, private (RFC 1918, fc00::/7),
    link-local, unspecified, shared (100.64/10), reserved or multicast."""
    if isinstance(address, IPv6Address) and (embedded := _embedded_ipv4(address)) is not None:
        address = embedded
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class PublicAddresses:
    """On-demand upstreams: public addresses only. `trusted` (address, port) pairs count as
    public too, which lets tests stand a "public" registry up on loopback."""

    trusted: frozenset[tuple[IPAddress, int]] | set[tuple[IPAddress, int]] = frozenset()

    def permits(self, address: IPAddress, port: int) -> bool:
        return is_public(address) or (address, port) in self.trusted


class ForbiddenAddress(PermissionError):
    """A connection the address policy refuses; aiohttp reports it as a connect error."""

    def __init__(self, address: str, port: int) -> None:
        super().__init__(errno.EACCES, f"connecting to {address} port {port} is not allowed")


def guarded_socket(policy: AddressPolicy) -> aiohttp.connector.SocketFactoryType:
    """A socket factory that refuses, right before connecting, an address `policy` forbids."""

    def open_socket(addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        host = str(sockaddr[0]).partition("%")[0]  # an IPv6 zone ("fe80::1%eth0") is no address
        if not policy.permits(ip_address(host), int(sockaddr[1])):
            raise ForbiddenAddress(host, int(sockaddr[1]))
        return socket.socket(family, kind, proto)

    return open_socket


def is_public_registry_name(host: str) -> bool:
    """Whether `?ns=` may name this host (already known to match the registry-host grammar).

    Refused before any lookup: address literals in any form `getaddrinfo` accepts
    (`127.1`, `2130706433`, `0x7f000001`: a last label of digits or hex is never a top-level
    domain, RFC 3696 section 2), `localhost` and `*.localhost` (RFC 6761 section 6.3), and
    single-label names, which resolvers complete with local search domains (`redis`).
    """
    name = host.rpartition(":")[0] if ":" in host else host
    labels = name.lower().split(".")
    last = labels[-1]
    if len(labels) < 2 or last == "localhost":
        return False
    return not (last.isdigit() or last.startswith("0x"))


@dataclass(frozen=True)
class Egress:
    """How upstream connections are made: the address policy on-demand upstreams obey, and
    (for tests) the resolver and the TLS context every upstream connector uses."""

    dynamic: AddressPolicy = field(default_factory=PublicAddresses)
    resolver: AbstractResolver | None = None
    ssl: ssl.SSLContext | None = None

    def connector(self, policy: AddressPolicy) -> aiohttp.TCPConnector:
        """A connector for one upstream's session; `policy` decides where it may connect."""
        return aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=300,
            resolver=self.resolver,
            ssl=self.ssl if self.ssl is not None else True,
            socket_factory=None if isinstance(policy, AnyAddress) else guarded_socket(policy),
        )


ANY_ADDRESS: Final = AnyAddress()
