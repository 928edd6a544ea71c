"""Checking what a client pulled: :func:`verify_dir` hashes every file of a skopeo ``dir:``
layout against the digest it is named after."""

from __future__ import annotations

from pathlib import Path

from harness.digests import sha256_digest

# Files skopeo's dir: transport writes that are not named by a digest.
DIR_MANIFEST = "manifest.json"
DIR_VERSION = "version"


class VerificationError(AssertionError):
    pass


def verify_dir(dest_dir: Path) -> dict[str, str]:
    """Check a skopeo ``dir:`` output and return ``{file name: sha256 digest of its content}``.

    skopeo 1.9 writes ``version``, ``manifest.json`` (the manifest bytes as pulled), each blob as a
    file named by the hex part of its sha256 digest, and with ``--all`` each instance manifest as
    ``<hex>.manifest.json``. Every digest-named file must hash to its name.
    """
    found: dict[str, str] = {}
    if not (dest_dir / DIR_MANIFEST).is_file():
        raise VerificationError(f"{dest_dir} has no {DIR_MANIFEST}")
    for path in sorted(dest_dir.iterdir()):
        if path.name == DIR_VERSION:
            continue
        if not path.is_file():
            raise VerificationError(f"unexpected entry {path}")
        digest = sha256_digest(path.read_bytes())
        if path.name != DIR_MANIFEST:
            named = path.name.removesuffix(".manifest.json")
            if len(named) != 64 or any(c not in "0123456789abcdef" for c in named):
                raise VerificationError(f"{path.name} is not named by a sha256 digest")
            if digest != f"sha256:{named}":
                raise VerificationError(f"{path.name} hashes to {digest}")
        found[path.name] = digest
    return found


def blob_digests(found: dict[str, str]) -> frozenset[str]:
    """The digests of the blobs (not manifests) in a :func:`verify_dir` result."""
    return frozenset(
        digest
        for name, digest in found.items()
        if name != DIR_MANIFEST and not name.endswith(".manifest.json")
    )
