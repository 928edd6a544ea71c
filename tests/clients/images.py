"""Images the client tests make themselves, with no registry outside this machine.

- :func:`build_runnable_image` is a real image a container runtime can start: one layer holding a
  statically linked busybox at ``/bin/busybox`` (Debian ``busybox-static``) and a second layer of
  random data, so a pull moves more than one blob. Its command is ``/bin/busybox echo hello``.
- :func:`python_rootfs` writes a tar of a minimal root filesystem assembled from this machine's
  own Debian Python (the interpreter, its standard library, the shared libraries they link, the
  wheels ``ensurepip`` installs, CA certificates) and busybox as ``/bin/sh``. ``docker import``
  turns it into the base image ``deploy/Dockerfile`` builds on, standing in for
  ``python:3.12-slim`` where Docker Hub cannot be reached. It takes a few seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from harness.digests import sha256_digest
from harness.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Blob,
    Format,
    Image,
    make_layer,
)

BUSYBOX = Path("/bin/busybox")
GREETING = "hello"
RUN_COMMAND = ("/bin/busybox", "echo", GREETING)
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _busybox_layer() -> tuple[bytes, bytes]:
    """``bin/busybox`` (mode 755) in a gzip tar: ``(compressed, uncompressed)``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("bin")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        content = BUSYBOX.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(content)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(content))
    uncompressed = buffer.getvalue()
    return gzip.compress(uncompressed, compresslevel=1, mtime=0), uncompressed


def build_runnable_image(fmt: Format = "docker", *, architecture: str = "amd64") -> Image:
    """An image whose default command prints :data:`GREETING` (see the module docstring)."""
    layer_type = OCI_LAYER_GZIP if fmt == "oci" else DOCKER_LAYER_GZIP
    # A layer of a few MiB: the mirror reads a body that large from the upstream's socket
    # (proxy.upstream.socket_body), so every client in the matrix gets one read that way.
    parts = [_busybox_layer(), make_layer(4 * 1024 * 1024)]
    layers = tuple(Blob.of(layer_type, compressed) for compressed, _ in parts)
    config_document = {
        "architecture": architecture,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [PATH_ENV], "Cmd": list(RUN_COMMAND)},
        "rootfs": {
            "type": "layers",
            "diff_ids": [sha256_digest(uncompressed) for _, uncompressed in parts],
        },
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": "ADD busybox /bin/busybox"},
            {"created": "2024-01-01T00:00:00Z", "created_by": "ADD random data"},
        ],
    }
    config = Blob.of(
        OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG, json.dumps(config_document).encode()
    )
    media_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
        indent=3,
    ).encode()
    return Image(
        media_type=media_type,
        manifest=manifest,
        digest=sha256_digest(manifest),
        config=config,
        layers=layers,
        architecture=architecture,
    )


# --------------------------------------------------------------------------------------------
# A Python base image from this machine's files
# --------------------------------------------------------------------------------------------

DEBIAN_PYTHON = Path("/usr/bin/python3")
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")
# Debian's merged /usr: these top-level names are symlinks into /usr.
_MERGED_USR = ("bin", "sbin", "lib", "lib64")
# Compiled wheels link libraries every Debian base image (python:3.12-slim included) has but
# no standard-library module needs: libgcc_s (bcrypt's Rust extension), and glibc's librt,
# libpthread and libdl (uvloop's libuv).
C_RUNTIME = sorted(
    path
    for name in ("libgcc_s.so.1", "librt.so.1", "libpthread.so.0", "libdl.so.2")
    for path in Path("/usr/lib").glob(f"*-linux-gnu/{name}")
)
_SKIP_STDLIB = ("/config-3.", "/test/", "/idlelib/", "/tkinter/", "/turtledemo/", "/lib2to3/")


def _shared_libraries(binaries: list[Path]) -> set[Path]:
    """Every shared object (and the dynamic loader) that ``ldd`` lists for ``binaries``."""
    result = subprocess.run(
        ["ldd", *map(str, binaries)], capture_output=True, text=True, check=False
    )
    return {Path(match.group(1)) for match in _LDD_LINE.finditer(result.stdout)}


def _python_files(python: Path) -> tuple[str, Iterator[Path]]:
    version = subprocess.run(
        [str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stdlib = Path(f"/usr/lib/python{version}")
    interpreter = Path(f"/usr/bin/python{version}")

    def files() -> Iterator[Path]:
        yield interpreter
        for path in stdlib.rglob("*"):
            if path.is_file() and not any(part in str(path) for part in _SKIP_STDLIB):
                yield path
        for path in Path("/usr/share/python-wheels").glob("*.whl"):
            yield path
        extensions = [interpreter, *stdlib.glob("lib-dynload/*.so")]
        libraries = _shared_libraries(extensions) | set(C_RUNTIME)
        for library in sorted(libraries):
            yield library
            yield library.resolve()
        yield Path("/etc/ssl/certs/ca-certificates.crt")
        yield BUSYBOX

    return version, files()


def python_rootfs(dest: Path, python: Path = DEBIAN_PYTHON) -> str:
    """Write the base image's root filesystem as an uncompressed tar; return the Python version.

    Requires Debian's ``python3`` and ``python3-venv`` (for the ``ensurepip`` wheels) and
    ``busybox-static``.
    """
    version, files = _python_files(python)
    seen: set[str] = set()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            if name in seen or name == "":
                return
            parent = name.rpartition("/")[0]
            add_dir(parent)
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
            seen.add(name)

        def add_symlink(name: str, target: str) -> None:
            if name in seen:
                return
            add_dir(name.rpartition("/")[0])
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
            seen.add(name)

        def add_text(name: str, text: str, mode: int = 0o644) -> None:
            add_dir(name.rpartition("/")[0])
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
            seen.add(name)

        for top in _MERGED_USR:
            add_dir(f"usr/{top}")
            add_symlink(top, f"usr/{top}")
        add_dir("tmp", 0o1777)
        add_dir("etc")
        add_dir("root", 0o700)
        add_text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        add_text("etc/group", "root:x:0:\n")
        for path in files:
            # Store every path under /usr, as merged /usr does.
            name = str(path).lstrip("/")
            top = name.split("/", 1)[0]
            if top in _MERGED_USR:
                name = f"usr/{name}"
            if name in seen:
                continue
            add_dir(name.rpartition("/")[0])
            if path.is_symlink():
                add_symlink(name, os.readlink(path))
                continue
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with path.open("rb") as handle:
                tar.addfile(info, handle)
            seen.add(name)
        add_symlink(f"usr/bin/python{version[0]}", f"python{version}")
        add_symlink("usr/local/bin/python", f"/usr/bin/python{version}")
        add_symlink("usr/local/bin/python3", f"/usr/bin/python{version}")
        for applet in ("sh", "mkdir", "chown", "chmod", "echo", "cat", "rm", "ls"):
            add_symlink(f"usr/bin/{applet}", "busybox")
    return version


if __name__ == "__main__":  # pragma: no cover - a manual aid: python images.py OUT.tar
    print(python_rootfs(Path(sys.argv[1])))
