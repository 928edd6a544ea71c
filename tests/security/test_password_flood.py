"""Password checks under attack: bcrypt is slow on purpose, so it runs in a small thread pool,
never on the event loop; results are remembered briefly; failures are rate-limited per user
and per source address; unknown users cost the same as known ones (issue 18, finding 3)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer
from pytest_aiohttp import AiohttpClient
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings
from proxy.server import keys as state
from proxy.server.access import FAILURES_PER_SOURCE, FAILURES_PER_USER, AccessControl

USERS = {
    user: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    for user, password in (("alice", "wonderland"), ("bob", "builder"))
}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class CountingCheck:
    """bcrypt's check, counting calls and the hashes it was asked about."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.hashes.append(hashed)
        return bcrypt.checkpw(password, hashed)


Client = TestClient[web.Request, web.Application]
MirrorWith = Callable[[AccessControl], Awaitable[Client]]


@pytest.fixture
def mirror_with(
    aiohttp_client: AiohttpClient, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> MirrorWith:
    async def start(access: AccessControl) -> Client:
        settings = Settings(
            upstreams=(UpstreamSettings("fake", URL(fake_upstream.url)),),
            cache_dir=tmp_path / "cache",
            cache_max_size=1024**3,
        )
        app = create_app(settings)
        app[state.ACCESS] = access
        return await aiohttp_client(app)

    return start


async def test_a_password_check_runs_off_the_event_loop(mirror_with: MirrorWith) -> None:
    started, released = threading.Event(), threading.Event()
    waited: list[bool] = []

    def slow_check(password: bytes, hashed: bytes) -> bool:
        started.set()
        waited.append(released.wait(timeout=5))  # False: nobody released it, the loop was stuck
        return bcrypt.checkpw(password, hashed)

    client = await mirror_with(AccessControl(dict(USERS), check=slow_check))
    attempt = asyncio.ensure_future(client.get("/v2/", headers=basic("alice", "guess")))
    assert await asyncio.to_thread(started.wait, 5)
    health = await client.get("/healthz")  # answered while the check is still running
    assert health.status == 200
    released.set()
    assert (await attempt).status == 401
    assert waited == [True]


async def test_an_unknown_user_costs_one_check_against_a_dummy_hash(
    mirror_with: MirrorWith,
) -> None:
    check = CountingCheck()
    client = await mirror_with(AccessControl(dict(USERS), check=check))
    unknown = await client.get("/v2/", headers=basic("mallory", "guess"))
    wrong = await client.get("/v2/", headers=basic("alice", "guess"))
    assert (unknown.status, wrong.status) == (401, 401)
    assert unknown.headers["WWW-Authenticate"] == wrong.headers["WWW-Authenticate"]
    assert await unknown.json() == await wrong.json()
    assert len(check.hashes) == 2
    assert check.hashes[0] not in USERS.values()
    assert check.hashes[0][:7] == USERS["alice"][:7]  # the same algorithm and cost


async def test_recent_results_are_remembered_right_and_wrong(mirror_with: MirrorWith) -> None:
    check = CountingCheck()
    client = await mirror_with(AccessControl(dict(USERS), check=check))
    for _ in range(3):
        assert (await client.get("/v2/", headers=basic("alice", "wonderland"))).status == 200
        assert (await client.get("/v2/", headers=basic("bob", "nope"))).status == 401
    assert len(check.hashes) == 2


async def test_concurrent_requests_with_the_same_credentials_share_one_check(
    mirror_with: MirrorWith,
) -> None:
    check = CountingCheck()
    client = await mirror_with(AccessControl(dict(USERS), check=check))
    answers = await asyncio.gather(
        *(client.get("/v2/", headers=basic("alice", "wonderland")) for _ in range(20))
    )
    assert [a.status for a in answers] == [200] * 20
    assert len(check.hashes) == 1


async def test_a_flood_of_wrong_passwords_for_one_user_is_answered_429(
    mirror_with: MirrorWith,
) -> None:
    check = CountingCheck()
    client = await mirror_with(AccessControl(dict(USERS), check=check))
    assert (await client.get("/v2/", headers=basic("alice", "wonderland"))).status == 200
    statuses = []
    for attempt in range(FAILURES_PER_USER + 5):
        response = await client.get("/v2/", headers=basic("alice", f"guess-{attempt}"))
        statuses.append(response.status)
    assert statuses == [401] * FAILURES_PER_USER + [429] * 5
    limited = await client.get("/v2/", headers=basic("alice", "another guess"))
    assert (await limited.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert int(limited.headers["Retry-After"]) > 0
    assert len(check.hashes) == 1 + FAILURES_PER_USER
    # The flood does not lock out the user's verified credentials, nor other users.
    assert (await client.get("/v2/", headers=basic("alice", "wonderland"))).status == 200
    assert (await client.get("/v2/", headers=basic("bob", "builder"))).status == 200


async def test_guessing_many_user_names_from_one_address_is_answered_429(
    mirror_with: MirrorWith,
) -> None:
    check = CountingCheck()
    client = await mirror_with(AccessControl(dict(USERS), check=check))
    statuses = []
    for attempt in range(FAILURES_PER_SOURCE + 2):
        response = await client.get("/v2/", headers=basic(f"user{attempt}", "guess"))
        statuses.append(response.status)
    assert statuses == [401] * FAILURES_PER_SOURCE + [429] * 2
    assert len(check.hashes) == FAILURES_PER_SOURCE
