"""Docker Hub's naming rules, in one place: the registry has several host names, a token realm
on another host, and keeps its official images under `library/` (what `docker pull nginx`
means). Pure values, no I/O.
"""

from __future__ import annotations

from typing import Final

DOCKER_HUB: Final = "docker.io"  # the name clients know it by
API_URL: Final = "https://registry-1.docker.io"  # where its registry API answers
# Every host name that means Docker Hub, in an image reference or an upstream URL.
HOSTS: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
# Token realms on another host than the registry's that may receive its credentials.
REALM_HOSTS: Final = {"registry-1.docker.io": ("auth.docker.io",)}


def registry_name(host: str) -> str:
    """The name clients use for a registry host: any of Docker Hub's is `docker.io`."""
    return DOCKER_HUB if host.lower() in HOSTS else host


def official_name(registry: str, name: str) -> str:
    """A one-component name on Docker Hub is an official image, under `library/`."""
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name
