"""Image references as people write them (`nginx`, `ghcr.io/org/app:1.2@sha256:...`).

The grammar is Docker's (distribution/reference)::

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path
    domain    := host [ ":" port ]       the first component, when it has a "." or a ":"
                                          or is "localhost"; otherwise the name is on docker.io
    path      := component ( "/" component )*

Normalisation as `docker pull` does it: no domain means `docker.io`, a one-component name on
docker.io means `library/<name>`, no tag and no digest means `:latest`.

On the mirror, a docker.io image is asked for without a prefix (the default upstream, what
Docker's `registry-mirrors` sends) and any other registry's with its name as the first path
component (`/v2/ghcr.io/org/app/...`, what a podman mirror `location` sends); see `routing`.
Pure values: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from proxy.errors import RegistryError
from proxy.oci import dockerhub
from proxy.oci.dockerhub import DOCKER_HUB
from proxy.oci.names import Digest, Repository, Tag

# host [":" port]: DNS labels or an IPv4 address, as the domain component of a reference.
_DOMAIN: Final = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::\d+)?"
)


class InvalidReference(ValueError):
    """Not an image reference; the message names the text and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    registry: str  # docker.io, ghcr.io, 127.0.0.1:5000
    repository: Repository  # as the registry names it: library/nginx, org/app
    tag: Tag | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        original = text.strip()
        if not original or any(c.isspace() for c in original):
            raise InvalidReference(f"{text!r} is not an image reference")
        rest, _, digest_text = original.partition("@")
        registry, path = _split_domain(rest)
        # A tag is after the last ":" that follows the last "/" (a port has a "/" after it).
        name, tag_text = path, ""
        if ":" in path.rsplit("/", 1)[-1]:
            name, _, tag_text = path.rpartition(":")
        try:
            repository = Repository.parse(dockerhub.official_name(registry, name))
            tag = Tag.parse(tag_text) if tag_text else None
            digest = Digest.parse(digest_text) if digest_text else None
        except RegistryError as exc:
            raise InvalidReference(f"{original!r}: {exc.message}") from None
        if tag is None and digest is None:
            tag = Tag("latest")
        return cls(registry, repository, tag, digest)

    @classmethod
    def parse_repository(cls, text: str) -> ImageReference:
        """A repository without tag or digest (`nginx`, `ghcr.io/org/app`), as the admin API
        takes it; `tag` stays None."""
        reference = cls.parse(text)
        if reference.digest is not None or ":" in text.strip().rsplit("/", 1)[-1]:
            raise InvalidReference(f"{text!r}: expected a repository without tag or digest")
        return cls(reference.registry, reference.repository, None, None)

    @property
    def mirror_name(self) -> str:
        """The repository as a mirror's `/v2/` path names it (see the module docstring)."""
        if self.registry == DOCKER_HUB:
            return self.repository.name
        return f"{self.registry}/{self.repository.name}"

    @property
    def manifest_reference(self) -> Tag | Digest:
        """What to ask the manifests endpoint for: the digest wins over the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None
        return self.tag

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository.name}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _split_domain(text: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    is_domain = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not sep or not is_domain:
        return DOCKER_HUB, text
    if not _DOMAIN.fullmatch(first):
        raise InvalidReference(f"{text!r}: {first!r} is not a registry host")
    return dockerhub.registry_name(first), rest
