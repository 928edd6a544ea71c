"""The log as a process writes it (proxy.ops.logging): access lines made directly read exactly as
the formatter writes a record, in order with other records."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.oci import Endpoint
from proxy.ops.logging import BackgroundHandler, configure_logging, direct_lines
from proxy.server import keys
from proxy.server.middleware import log_access

ACCESS = "registry_proxy.access"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The process's logging set up as `serve` does, writing here instead of stderr; then put
    back as pytest had it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("info", "json")
    written = io.StringIO()
    background = root.handlers[0]
    assert isinstance(background, BackgroundHandler)
    background.target.setStream(written)
    try:
        yield written
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_an_access_line_made_directly_reads_as_its_record_would(json_log: io.StringIO) -> None:
    path = "/v2/team/app/manifests/1.0?ns=docker.io&odd=%22q%22"
    noted = keys.Notes(Endpoint.MANIFEST, upstream="docker.io", identity="anonymous")
    access = logging.getLogger(ACCESS)
    listener = logging.NullHandler()  # on the access logger itself: records, not direct lines
    # The same fields again with another duration: a later line reuses the text made for an
    # earlier one.
    agents = ('ctr "\u2603"\t', None, "skopeo/1.13")
    remotes = ("10.0.0.7", "2001:db8::7", "10.0.0.7")
    for aborted in (None, "client"):
        noted.aborted = aborted
        for scale in (1, 3):
            for agent, duration, remote in zip(agents, (0.000_25, 1.5, 0.1), remotes, strict=True):
                headers = {} if agent is None else {"User-Agent": agent}
                request = make_mocked_request("GET", path, headers=headers).clone(remote=remote)
                log_access(request, noted, 200, "hit", 949, duration * scale)
                access.addHandler(listener)
                log_access(request, noted, 200, "hit", 949, duration * scale)
                access.removeHandler(listener)
    logging.getLogger().handlers[0].close()

    written = lines(json_log.getvalue())
    assert len(written) == 24
    for entry in written:
        entry.pop("time")
    made, recorded = written[0::2], written[1::2]
    assert made == recorded
    assert [(e["remote"], e["user_agent"], e["duration_ms"]) for e in made[:6]] == [
        ("10.0.0.7", 'ctr "\u2603"\t', 0.25),
        ("2001:db8::7", None, 1500.0),
        ("10.0.0.7", "skopeo/1.13", 100.0),
        ("10.0.0.7", 'ctr "\u2603"\t', 0.75),
        ("2001:db8::7", None, 4500.0),
        ("10.0.0.7", "skopeo/1.13", 300.0),
    ]
    assert {entry["path"] for entry in made} == {path}
    assert [entry["aborted"] for entry in made] == [False] * 6 + [True] * 6
    assert {entry.get("abort_cause") for entry in made[6:]} == {"client"}


def test_lines_waiting_on_the_event_loop_go_before_a_later_record(
    json_log: io.StringIO,
) -> None:
    access = logging.getLogger(ACCESS)

    async def requests() -> None:
        direct = direct_lines(access)
        assert direct is not None
        for status in (200, 404, 500):
            direct.write(logging.INFO, ACCESS, "", '"status": ', status, "")

    asyncio.run(requests())  # the batch's timer never fires: the loop is gone
    logging.getLogger("registry_proxy.other").warning("last")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, BackgroundHandler)
    handler.close()

    written = lines(json_log.getvalue())
    assert [entry.get("status") for entry in written] == [200, 404, 500, None]
    assert written[-1]["message"] == "last"


def test_a_handler_of_its_own_on_the_access_logger_gets_records(json_log: io.StringIO) -> None:
    access = logging.getLogger(ACCESS)
    listener = logging.NullHandler()
    access.addHandler(listener)
    try:
        assert direct_lines(access) is None  # records, so the listener sees them
    finally:
        access.removeHandler(listener)
    assert direct_lines(access) is not None
