"""Content digests as the OCI image spec writes them."""

from __future__ import annotations

import hashlib


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of exactly these bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
