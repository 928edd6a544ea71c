"""Real small filesystems for disk-full and read-only tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of `size` at `path`, so ENOSPC and EROFS come from the kernel, not from a
    mock."""
    if os.geteuid() != 0:
        pytest.fail(
            "mounting a tmpfs for disk-full or read-only tests needs root (CI runs as root)"
        )
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
