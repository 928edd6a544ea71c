"""Repeats answered at the connection (proxy.server.repeats): a prepared manifest hit goes to the
socket before aiohttp routes the request, byte for byte what the app sent for the first hit,
and only for requests the app would have answered that way."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer
from harness.mirror import StartMirror

from proxy.server import keys as state
from proxy.server import routes
from proxy.server.repeats import MAX_UNSENT, Repeats
from proxy.workers.sharding import RELAY_HEADER

Client = TestClient[web.Request, web.Application]
TAG_PATH = "/v2/team/app/manifests/1.0"
ACCESS = "registry_proxy.access"
DATE = re.compile(rb"\r\nDate: ([^\r]*)\r\n")
IMF_FIXDATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"
)


class Connection:
    """One keep-alive connection speaking raw HTTP/1.1, responses read by their length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: Client) -> Connection:
        assert client.server.port is not None
        return cls(*await asyncio.open_connection("127.0.0.1", client.server.port))

    async def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))
        await self.writer.drain()

    async def response(self, *, head: bool = False) -> bytes:
        header = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", header, re.IGNORECASE)
        size = 0 if head or length is None else int(length.group(1))
        return header + await self.reader.readexactly(size)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def request(method: str, path: str = TAG_PATH, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: mirror", f"Accept: {ACCEPT_ALL_MANIFESTS}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def undated(response: bytes) -> bytes:
    """The response with its Date value (RFC 9110 section 5.6.7's IMF-fixdate) left out."""
    [date] = DATE.findall(response)
    assert IMF_FIXDATE.fullmatch(date), date
    return DATE.sub(b"\r\nDate: -\r\n", response)


@pytest.fixture
def app_repeats(monkeypatch: pytest.MonkeyPatch) -> mock.Mock:
    """Counts the repeats the app answered (`routes._repeat`), the path this module avoids."""
    spy = mock.Mock(wraps=routes._repeat)
    monkeypatch.setattr(routes, "_repeat", spy)
    return spy


async def warmed(mirror: StartMirror, fake_upstream: FakeUpstreamServer) -> tuple[Client, bytes]:
    """A mirror whose tag answer is cached, and the manifest."""
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    first = await client.get(TAG_PATH, headers={"Accept": ACCEPT_ALL_MANIFESTS})
    assert first.headers["X-Cache"] == "MISS"
    return client, image.manifest_bytes


def prepared_answers(client: Client, answered: str) -> float:
    registry = client.app[state.METRICS].registry
    labels = {"answered": answered}
    return registry.get_sample_value("registry_proxy_prepared_answers_total", labels) or 0.0


def hits(client: Client) -> float:
    registry = client.app[state.METRICS].registry
    labels = {"kind": "tag", "result": "hit"}
    return registry.get_sample_value("registry_proxy_cache_requests_total", labels) or 0.0


async def test_a_repeat_is_the_first_hits_bytes_sent_at_the_connection(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    app_repeats: mock.Mock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client, manifest = await warmed(mirror, fake_upstream)
    connection = await Connection.open(client)
    await connection.send(request("GET"), request("HEAD"))
    first_get, first_head = await connection.response(), await connection.response(head=True)
    assert len(client.app[state.PREPARED]) == 2

    # Pipelined repeats and a request that is no repeat, on the same connection, in order.
    await connection.send(request("GET"), request("HEAD"), request("GET", "/v2/"), request("GET"))
    get, head = await connection.response(), await connection.response(head=True)
    ping, get_again = await connection.response(), await connection.response()
    await connection.close()

    assert get.endswith(b"\r\n\r\n" + manifest)
    assert undated(get) == undated(get_again) == undated(first_get)
    assert undated(head) == undated(first_head)
    assert b"Content-Length: %d\r\n" % len(manifest) in head
    assert ping.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ping.endswith(b"{}")
    assert app_repeats.call_count == 0
    assert prepared_answers(client, "connection") == 3
    assert prepared_answers(client, "app") == 0
    # Counted as every hit is, and in the admin API's traffic.
    assert hits(client) == 5
    [(repository, served)] = client.app[state.TRAFFIC].top(1)
    assert (repository, served.requests) == ("fake/team/app", 6)
    # One access line each, as the app writes it.
    lines = [r.access for r in caplog.records if r.name == ACCESS]  # type: ignore[attr-defined]
    assert [(line["method"], line["cache"], line["bytes"]) for line in lines[-4:]] == [
        ("GET", "hit", len(manifest)),
        ("HEAD", "hit", 0),
        ("GET", "pass", 2),
        ("GET", "hit", len(manifest)),
    ]
    assert {line["route"] for line in lines[-4:]} == {"manifest", "ping"}


async def test_requests_a_connection_answer_does_not_fit_go_through_the_app(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    app_repeats: mock.Mock,
    tmp_path: Path,
) -> None:
    client, manifest = await warmed(mirror, fake_upstream)
    connection = await Connection.open(client)
    await connection.send(request("GET"))
    await connection.response()  # the first hit: prepared
    await connection.send(request("GET", TAG_PATH, "Content-Length: 2") + b"{}")
    with_body = await connection.response()
    await connection.send(request("GET", TAG_PATH, f"{RELAY_HEADER}: 1"))
    claimed_relay = await connection.response()  # over TCP: an ordinary client's repeat
    await connection.close()
    assert app_repeats.call_count == 1
    assert with_body.endswith(manifest)
    assert claimed_relay.endswith(manifest)

    # HTTP/1.0 and a last request: answered in their own terms by aiohttp.
    for version, extra, expected in (
        ("1.0", (), b"HTTP/1.0 200 OK\r\n"),
        ("1.1", ("Connection: close",), b"Connection: close\r\n"),
    ):
        connection = await Connection.open(client)
        await connection.send(request("GET", TAG_PATH, *extra, version=version))
        answer = await connection.response()
        assert expected in answer
        assert answer.endswith(manifest)
        assert await connection.reader.read() == b""  # closed after it
        await connection.close()
    assert app_repeats.call_count == 3

    # A worker's Unix socket carries relays between workers: the app answers those.
    assert client.server.runner is not None
    site = web.UnixSite(client.server.runner, str(tmp_path / "worker.sock"))
    await site.start()
    relay = Connection(*await asyncio.open_unix_connection(str(tmp_path / "worker.sock")))
    await relay.send(request("GET", TAG_PATH, f"{RELAY_HEADER}: 1"))
    assert (await relay.response()).endswith(manifest)
    await relay.close()
    await site.stop()
    assert app_repeats.call_count == 4
    assert prepared_answers(client, "app") == 4
    assert prepared_answers(client, "connection") == 1  # the claimed relay over TCP


async def test_a_client_not_reading_its_answers_is_answered_through_the_app(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client, _ = await warmed(mirror, fake_upstream)
    await client.get(TAG_PATH, headers={"Accept": ACCEPT_ALL_MANIFESTS})  # prepared
    repeats = Repeats(client.app)
    asked = make_mocked_request("GET", TAG_PATH, headers={"Accept": ACCEPT_ALL_MANIFESTS})
    transport = mock.Mock(spec=asyncio.Transport)
    transport.is_closing.return_value = False
    transport.get_write_buffer_size.return_value = MAX_UNSENT + 1
    assert not repeats.answer(asked, transport)
    transport.get_write_buffer_size.return_value = 0
    transport.is_closing.return_value = True  # aiohttp tells its loop the client went
    assert not repeats.answer(asked, transport)
    transport.write.assert_not_called()
    transport.is_closing.return_value = False
    assert repeats.answer(asked, transport)
    transport.write.assert_called_once()


async def test_a_header_aiohttp_would_refuse_is_never_prepared(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client, _ = await warmed(mirror, fake_upstream)
    answers = client.app[state.PREPARED]
    kept = answers.get(make_mocked_request("GET", TAG_PATH))
    assert kept is None
    first_hit = await client.get(TAG_PATH, headers={"Accept": ACCEPT_ALL_MANIFESTS})
    entry = answers.get(
        make_mocked_request("GET", TAG_PATH, headers={"Accept": ACCEPT_ALL_MANIFESTS})
    )
    assert entry is not None
    assert first_hit.status == 200
    other = make_mocked_request("GET", "/v2/team/app/manifests/2.0")
    for injected in ("a\r\nSet-Cookie: x=1", "a\nb", "a\x00"):
        headers = {**entry.headers, "Content-Type": injected}
        answers.keep(other, entry.upstream, entry.repository, entry.answer, headers, "tag", {})
        assert answers.get(other) is None
