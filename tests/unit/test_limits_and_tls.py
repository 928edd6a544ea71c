"""Limits on what clients and upstreams may cost, and HTTPS with certificate reloads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer
from harness.mirror import StartMirror, serve_command
from harness.ports import free_port
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.oci import Digest, Repository
from proxy.upstream.client import Upstream


def blob_path(digest: str) -> str:
    return f"/v2/team/app/blobs/{digest}"


async def test_upstream_downloads_wait_for_a_free_slot(fake_upstream: FakeUpstreamServer) -> None:
    registry = fake_upstream.registry
    registry.add_image("team/app", "1.0", [b"x"])
    first, second = os.urandom(300_000), os.urandom(300_000)
    first_digest, second_digest = registry.add_blob(first), registry.add_blob(second)
    slot = asyncio.Semaphore(1)
    upstream = Upstream(UpstreamSettings("fake", URL(fake_upstream.url)), download_slots=(slot,))
    repository = Repository.parse("team/app")
    try:
        holding = await upstream.open_blob(repository, Digest.parse(first_digest))
        waiting = asyncio.create_task(upstream.open_blob(repository, Digest.parse(second_digest)))
        await asyncio.sleep(0)  # let the task run up to the semaphore, where it must block
        assert slot.locked()
        assert not waiting.done()
        assert registry.count("GET", path_contains=second_digest) == 0

        holding.close()  # frees the slot
        stream = await waiting
        body = b"".join([chunk async for chunk in stream.chunks()])
        stream.close()
        assert body == second
        assert registry.count("GET", path_contains=second_digest) == 1
        assert not slot.locked()
    finally:
        await upstream.close()


async def test_a_blob_over_the_size_limit_is_refused_clearly(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(os.urandom(200_000))
    client = await mirror(max_blob_size=100_000)
    response = await client.get(blob_path(digest))
    assert response.status == 400
    assert (await response.json())["errors"][0]["code"] == "SIZE_INVALID"


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def pem_fingerprint(cert: Path) -> bytes:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).digest()


async def test_https_is_served_and_a_sighup_reloads_the_certificate(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    first_cert, first_key = make_certificate(tmp_path, "first")
    second_cert, second_key = make_certificate(tmp_path, "second")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first_cert.read_bytes())
    key.write_bytes(first_key.read_bytes())
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *serve_command(port, tmp_path / "cache", "--upstream", fake_upstream.url,
                       "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "warning"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:  # an external process: poll its port until it answers TLS
            try:
                served = await asyncio.to_thread(served_certificate, port)
                break
            except OSError:
                if process.returncode is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert hashlib.sha256(served).digest() == pem_fingerprint(first_cert)

        async with aiohttp.ClientSession() as session:
            response = await session.get(f"https://127.0.0.1:{port}/v2/", ssl=False)
            assert response.status == 200
            # Repeated hits on one TLS connection: the later ones answered at the connection
            # (proxy.server.repeats), through the TLS transport.
            url = f"https://127.0.0.1:{port}/v2/team/app/manifests/1.0"
            answers = []
            for _ in range(4):
                async with session.get(url, headers=accept, ssl=False) as manifest:
                    answers.append(
                        (manifest.status, manifest.headers["X-Cache"], await manifest.read())
                    )
            assert [(status, cache) for status, cache, _ in answers] == [
                (200, "MISS"),
                (200, "HIT"),
                (200, "HIT"),
                (200, "HIT"),
            ]
            assert {body for _, _, body in answers} == {image.manifest_bytes}

        cert.write_bytes(second_cert.read_bytes())
        key.write_bytes(second_key.read_bytes())
        process.send_signal(signal.SIGHUP)
        expected = pem_fingerprint(second_cert)
        while True:  # the reload happens in the other process; poll until it shows
            served = await asyncio.to_thread(served_certificate, port)
            if hashlib.sha256(served).digest() == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert hashlib.sha256(served).digest() == expected
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=20)
